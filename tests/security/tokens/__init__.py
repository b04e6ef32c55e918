"""Token handling per RFC 8725 (JWT best current practices), proven against all three programs.

One marketplace, a two-instance AIIDA fleet registered at it and an EP sink that
fetched the marketplace's keys run in-process on port 0 for the whole package
(conftest.py; tests.support.token_programs, token_forgery, raw_http2).
Forged tokens are signed with the marketplace's own private key, so each
rejection is due to the rule under test and never to a bad signature; every
table also has a control row the program accepts, proving the forgery is
otherwise right. Rejections assert the status code, the ErrorInfo reason and
the program's error domain.

Not repeated here (see tests/marketplace/test_identity.py, tests/aiida_stub/test_auth.py,
tests/eddie_sink/test_auth.py): garbage, `alg: none`, HS256 with the public key,
a tampered payload, expired tokens, tokens of another key, the wrong audience on
one program, a missing or empty bearer, refresh rotation and reuse detection.
"""
