"""Test support shared by the unit and integration tiers (fakes passed through constructors)."""
