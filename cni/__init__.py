"""The CNI face of the plugin: environment, network config, results, errors, and the
state machine that runs one invocation."""
