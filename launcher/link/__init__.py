"""What both ends of the control-plane link share: wire limits and addresses, reason words,
the enrollment token format and the worker's half of the PKI. Imports only the shared leaves,
so the worker and the client never import the control plane.
"""
