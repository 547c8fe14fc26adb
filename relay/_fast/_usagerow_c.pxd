# Declarations that compile _usagerow_py.py into _usagerow_c: the Python
# source is the single definition, this file only adds C types. The counts
# stay Python integers (unbounded, as in the pure twin); the USD sums are
# C doubles, which is what a Python float holds.

cdef class UsageRow:
    cdef public object requests
    cdef public object estimated_requests
    cdef public object prompt_tokens
    cdef public object completion_tokens
    cdef public object cached_tokens
    cdef public double cost_usd
    cdef public object cache_hits
    cdef public double saved_usd

    cpdef void add_paid(
        self, bint estimated, object prompt, object completion, object cached, double cost,
        double saved
    )
    cpdef void add_hit(self, double saved)
    cpdef void add_row(self, UsageRow other)
    cpdef dict counts(self)


cpdef void add_paid(
    UsageRow totals, UsageRow model_row, UsageRow key_row, bint estimated, object prompt,
    object completion, object cached, double cost, double saved
)


cdef class UsageLedger:
    cdef public Py_ssize_t max_keys
    cdef double _since
    cdef UsageRow _totals
    cdef dict _models
    cdef dict _keys

    cdef UsageRow _key_row(self, str key)
    cpdef void record(
        self, str model_label, str key_hash, object usage, double cost, double saved=*,
        bint hit=*
    ) except *
    cpdef void merge(self, UsageLedger other) except *
