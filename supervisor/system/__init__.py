"""Operating-system plumbing every role shares: forking, privileges, listening sockets,
systemd socket activation and sd_notify, and logging."""
