"""Everything a student with another tokenizer needs: the alignment of two tokenizations
(:mod:`.align`, stored beside a cache), the batches that carry it (:mod:`.batches`) and the
cross-vocabulary methods (:mod:`.methods`)."""
