"""The loader server: datasets in shared memory, worker processes, the ZeroMQ front end."""
