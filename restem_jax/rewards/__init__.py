"""Binary rewards r(x, y) for ReST-EM: math answers (math.py), programs (code.py)."""
