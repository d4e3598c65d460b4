"""VMs: the state machine and the transitions that apply it, with their listeners."""
