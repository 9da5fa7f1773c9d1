# Baton regression case.
request = InvalidHTTPVersion
