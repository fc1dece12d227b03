"""Stage two: a student trained from the cache (or a live teacher) without loading the teacher.

:mod:`.distill` is the ``distill`` stage, which builds what a run needs and hands it to the one
training loop, :mod:`.trainer`. Examples and batches come from :mod:`.batches` (a cache, a corpus,
the live teacher) and :mod:`.aligned` (a cache seen by a student of another tokenizer), on-policy
samples from :mod:`.onpolicy`; the projectors between the two hidden spaces are :mod:`.projectors`,
held-out evaluation during training :mod:`.validation`, FSDP sharding :mod:`.sharding`; a student
is made from a teacher (layers kept, vocabulary transplanted) by :mod:`.student`. The losses are
:mod:`dskd_batch.losses`, the methods :mod:`dskd_batch.methods`.
"""
