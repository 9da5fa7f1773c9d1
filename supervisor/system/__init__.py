"""Operating-system plumbing every role shares: forking and reaping, users and groups,
privileges, listening sockets, systemd socket activation and sd_notify, and logging."""
