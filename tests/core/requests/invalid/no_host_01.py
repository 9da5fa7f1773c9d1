# Baton regression case.
request = MissingHost
