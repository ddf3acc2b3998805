"""The `poelm` subcommands, one module per group (docs/cli.md): build (tokenizer, data, init,
pretrain, convert), models (specialist, inspect, digest, export, check-preservation), decode (generate,
chat, compose, calibrate), serve, evaluate (eval). Each module's `add_commands(sub)` declares its
commands' arguments; each `cmd_*` is a thin call into the library."""
