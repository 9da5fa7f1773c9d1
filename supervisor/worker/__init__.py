"""The worker process: drop to the app's user, import the app, serve it."""
