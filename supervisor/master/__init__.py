"""The master process: its loop and commands, the worker lifecycle, the helper processes
(balancer, watcher), master upgrade, the control socket and status reports."""
