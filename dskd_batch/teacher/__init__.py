"""Stage one: the teacher once over a corpus, into a cache.

:mod:`.forward` runs a teacher's body once and keeps its outputs at the target positions (the one
forward function, used by the live teacher and on-policy scoring too); :mod:`.caching` is the
``cache-teacher`` stage (corpus in, shards and manifest out, the exactness check, resume, sharding
over machines, alignment sidecars); :mod:`.sizing` says how many bytes and hours a cache will take
before any of it is written. The cache's format itself is :mod:`dskd_batch.cache`.
"""
