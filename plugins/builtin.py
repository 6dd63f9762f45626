"""Built-in plugins, registered through the same path as third-party entry points."""

# (plugin name, "module:attribute") in registration order.
BUILTIN_PLUGINS = [
    ("flash", "sftplug.plugins.sdpa:flash"),
    ("efficient", "sftplug.plugins.sdpa:efficient"),
    ("cudnn", "sftplug.plugins.sdpa:cudnn"),
    ("math", "sftplug.plugins.sdpa:math"),
    ("triton", "sftplug.plugins.triton_attention:triton"),
    ("chunked", "sftplug.plugins.chunked:chunked"),
    ("flex", "sftplug.plugins.flex_attention:flex"),
    ("linear", "sftplug.plugins.linear_attention:linear"),
    ("fla", "sftplug.plugins.fla_linear_attention:fla"),
    ("triton-ops", "sftplug.plugins.triton_ops:triton_ops"),
    ("precision", "sftplug.plugins.precision:precision"),
    ("hf", "sftplug.plugins.loaders:hf_checkpoint"),
    ("presets", "sftplug.plugins.loaders:presets"),
    ("sftplug-checkpoint", "sftplug.plugins.loaders:sftplug_checkpoint"),
    ("resume", "sftplug.plugins.resume:resume"),
    ("tensorboard", "sftplug.plugins.loggers:tensorboard"),
    ("wandb", "sftplug.plugins.loggers:wandb"),
]
