# Baton regression case.
request = InvalidRequestLine
