# Baton regression case.
request = InvalidHeaderName
