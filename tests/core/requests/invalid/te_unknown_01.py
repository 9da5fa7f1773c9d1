# Baton regression case.
request = InvalidHeader
