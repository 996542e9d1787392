"""The user's side of tetrarch: the Python client, the embedded server and the command line."""
