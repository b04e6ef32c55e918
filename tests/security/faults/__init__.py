"""Faults the marketplace must survive, each with the property that breaks if it does not.

1. Hostile AIIDAs on the Connect stream (slow, flooding, wrong query ids,
   malformed bytes, killed or frozen mid-search): the misbehaving instance is
   counted as what it is, loses at most its own stream, and every well-behaved
   instance's answer is still exactly right.
2. A marketplace SIGKILLed while customers approve: after a restart on the same
   data directory no accepted decision is lost or duplicated, every approving
   AIIDA holds each permission once, and readings reach the sink, unique.
3. PostgreSQL stopped under a running marketplace: UNAVAILABLE with an ErrorInfo
   reason (not INTERNAL) within a bounded time, health still answers, and the
   same process recovers when the database is back.
4. SIGTERM under load: in-flight calls finish, health goes NOT_SERVING, new calls
   are refused, the process exits 0 within the grace period.

Everything runs over real gRPC (servers on port 0, generated stubs); the slow
cases start real processes and are marked `slow`. One module per fault:
test_hostile_aiidas (1), test_marketplace_crash (2), test_database_outage (3),
test_shutdown_under_load (4); the arena they share is tests.support.arena.
"""
