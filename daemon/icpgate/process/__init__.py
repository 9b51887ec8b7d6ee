"""The process model: the supervisor, the gate workers, the service process and their start-up checks.

Binds the listening sockets, forks the workers, runs the control plane's services beside them.
May import everything below the command line; only `cli` imports it.
"""
