"""The watcher process: report changes to the config file and watched code paths."""
