"""`eddie`: the command line client of the EDDIE marketplace, for customers and eligible parties.

    eddie --marketplace 127.0.0.1:50051 login --email alice@example.org
    eddie instances claim aiida-alice --pairing-code ALICE-2026
    eddie consent

Commands live in `eddie_cli.commands`, one module per workflow; the session kept between
calls in `eddie_cli.session_store`; the channel, login refresh and reachability check in
`eddie_cli.connection`; tables and JSON in `eddie_cli.output`.
"""
