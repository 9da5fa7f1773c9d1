"""Configuration: the model (frozen dataclasses), reading TOML into it, bind specs, the
grammars of host names and module specs, and the reload plan (a pure diff of two
configs). Nothing here forks, binds or imports app code."""
