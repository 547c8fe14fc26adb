# cython: language_level=3, boundscheck=False, wraparound=False
"""The memory cache's table in C (twin of ``_lru_py``, whose docstring is the
contract: same methods, same errors, same order).

One array of fixed-size slots holds each entry: its key inline (at most 32
bytes), a reference to its value and the links of the recency list; an
index of 32-bit slot numbers (open addressing, linear probing, deletion by
backward shift, so no tombstones) finds a key. Slots are handed out in
order, then from a free list; the slot array doubles as entries come (up to
the capacity) and the index is rebuilt larger when it passes 2/3 full, so a
table holds memory for the entries it has held, not for its bound.
"""

from cpython.mem cimport PyMem_RawCalloc, PyMem_RawFree, PyMem_RawRealloc
from cpython.ref cimport PyObject, Py_INCREF, Py_DECREF
from libc.stdint cimport int32_t, uint8_t, uint32_t
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize

cdef enum:
    KEY_MAX = 32  # bytes of a key kept inline

MAX_KEY = KEY_MAX


cdef struct Slot:
    PyObject* value      # NULL: the slot is free
    int32_t older        # the neighbours in recency order (-1: none)
    int32_t newer
    uint32_t hash
    uint8_t klen
    uint8_t key[KEY_MAX]


cdef inline uint32_t _hash(const uint8_t* key, Py_ssize_t n) noexcept nogil:
    # FNV-1a: keys are mostly SHA-256 digests already, but short ones (tests,
    # other callers) must spread too.
    cdef uint32_t h = 2166136261u
    cdef Py_ssize_t i
    for i in range(n):
        h = (h ^ key[i]) * 16777619u
    return h


cdef class LruTable:
    cdef Slot* _slots
    cdef int32_t* _index     # bucket -> slot number + 1 (0: empty)
    cdef uint32_t _mask
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _count
    cdef int32_t _allocated  # slots in _slots (grown as entries come, up to capacity)
    cdef int32_t _fresh      # slots below this were handed out at least once
    cdef int32_t _free       # head of the free list (linked by .newer), -1: none
    cdef int32_t _oldest
    cdef int32_t _newest

    def __cinit__(self, Py_ssize_t capacity):
        if capacity < 0:
            raise ValueError("capacity must not be negative")
        # Any bound is accepted (the configured max_entries); the arrays
        # grow with the entries actually held, and a memory cache's byte
        # bound evicts long before a slot number could overflow.
        self._capacity = capacity
        self._count = 0
        self._allocated = 0
        self._fresh = 0
        self._free = -1
        self._oldest = -1
        self._newest = -1
        self._slots = NULL
        self._index = <int32_t*>PyMem_RawCalloc(8, sizeof(int32_t))
        if self._index == NULL:
            raise MemoryError()
        self._mask = 7

    cdef int _grow(self) except -1:
        """Room for one more slot: the slot array doubled (up to capacity),
        and the index rebuilt larger when it would pass 2/3 full."""
        cdef Py_ssize_t want = self._allocated * 2 if self._allocated else 16
        if want > self._capacity:
            want = self._capacity
        if want > 0x3FFFFFFF:
            want = 0x3FFFFFFF
        if want <= self._allocated:
            raise MemoryError("the table cannot grow")
        cdef Slot* slots = <Slot*>PyMem_RawRealloc(self._slots, want * sizeof(Slot))
        if slots == NULL:
            raise MemoryError()
        self._slots = slots
        self._allocated = <int32_t>want
        cdef uint32_t buckets = self._mask + 1
        if buckets >= <uint32_t>(want + want // 2 + 1):
            return 0
        while buckets < <uint32_t>(want + want // 2 + 1):
            buckets <<= 1
        cdef int32_t* index = <int32_t*>PyMem_RawCalloc(buckets, sizeof(int32_t))
        if index == NULL:
            raise MemoryError()
        PyMem_RawFree(self._index)
        self._index = index
        self._mask = buckets - 1
        cdef int32_t s = self._oldest
        cdef uint32_t i
        while s >= 0:
            i = self._slots[s].hash & self._mask
            while index[i] != 0:
                i = (i + 1) & self._mask
            index[i] = s + 1
            s = self._slots[s].newer
        return 0

    def __dealloc__(self):
        if self._slots != NULL:
            self._release_all()
            PyMem_RawFree(self._slots)
        if self._index != NULL:
            PyMem_RawFree(self._index)

    @property
    def capacity(self):
        return self._capacity

    def __len__(self):
        return self._count

    # -- lookups -----------------------------------------------------------
    cdef Py_ssize_t _bucket_of(self, bytes key, uint32_t h) noexcept:
        """The bucket holding *key*, or the empty one where it would go."""
        cdef const uint8_t* k = <const uint8_t*>PyBytes_AS_STRING(key)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        cdef uint32_t i = h & self._mask
        cdef int32_t s
        cdef Slot* slot
        while True:
            s = self._index[i]
            if s == 0:
                return i
            slot = &self._slots[s - 1]
            if slot.hash == h and slot.klen == n and memcmp(slot.key, k, n) == 0:
                return i
            i = (i + 1) & self._mask

    cdef int32_t _find(self, bytes key) noexcept:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        if n > KEY_MAX:
            return -1
        cdef uint32_t h = _hash(<const uint8_t*>PyBytes_AS_STRING(key), n)
        return self._index[self._bucket_of(key, h)] - 1

    # -- the recency list --------------------------------------------------
    cdef inline void _unlink(self, int32_t s) noexcept:
        cdef Slot* slot = &self._slots[s]
        if slot.older >= 0:
            self._slots[slot.older].newer = slot.newer
        else:
            self._oldest = slot.newer
        if slot.newer >= 0:
            self._slots[slot.newer].older = slot.older
        else:
            self._newest = slot.older

    cdef inline void _append(self, int32_t s) noexcept:
        cdef Slot* slot = &self._slots[s]
        slot.older = self._newest
        slot.newer = -1
        if self._newest >= 0:
            self._slots[self._newest].newer = s
        else:
            self._oldest = s
        self._newest = s

    # -- removal -------------------------------------------------------------
    cdef object _remove(self, int32_t s):
        """Take slot *s* out of the index, the list and use; its value."""
        cdef Slot* slot = &self._slots[s]
        cdef uint32_t i = slot.hash & self._mask
        while self._index[i] != s + 1:
            i = (i + 1) & self._mask
        # Backward shift: pull later members of the probe run into the hole.
        cdef uint32_t j = i
        cdef uint32_t home
        while True:
            j = (j + 1) & self._mask
            if self._index[j] == 0:
                break
            home = self._slots[self._index[j] - 1].hash & self._mask
            # Movable unless its home lies cyclically in (i, j].
            if (j > i and (home <= i or home > j)) or (j < i and home <= i and home > j):
                self._index[i] = self._index[j]
                i = j
        self._index[i] = 0
        self._unlink(s)
        value = <object>slot.value
        Py_DECREF(value)  # the table's reference; *value* holds its own
        slot.value = NULL
        slot.newer = self._free
        self._free = s
        self._count -= 1
        return value

    cdef void _release_all(self) noexcept:
        cdef int32_t s = self._oldest
        cdef int32_t nxt
        while s >= 0:
            nxt = self._slots[s].newer
            Py_DECREF(<object>self._slots[s].value)
            self._slots[s].value = NULL
            s = nxt

    # -- the API (see _lru_py) -----------------------------------------------
    def get(self, bytes key):
        cdef int32_t s = self._find(key)
        if s < 0:
            return None
        if s != self._newest:
            self._unlink(s)
            self._append(s)
        return <object>self._slots[s].value

    def put(self, bytes key, value):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(key)
        if n > KEY_MAX:
            raise ValueError(f"a key is at most {KEY_MAX} bytes")
        if value is None:
            raise ValueError("None is not a value")
        cdef uint32_t h = _hash(<const uint8_t*>PyBytes_AS_STRING(key), n)
        cdef Py_ssize_t b = self._bucket_of(key, h)
        cdef int32_t s = self._index[b] - 1
        cdef Slot* slot
        if s >= 0:
            slot = &self._slots[s]
            Py_INCREF(value)
            Py_DECREF(<object>slot.value)
            slot.value = <PyObject*>value
            if s != self._newest:
                self._unlink(s)
                self._append(s)
            return
        if self._count >= self._capacity:
            raise OverflowError("the table is full")
        if self._free >= 0:
            s = self._free
            self._free = self._slots[s].newer
        else:
            if self._fresh == self._allocated:
                self._grow()
                b = self._bucket_of(key, h)  # the index may have been rebuilt
            s = self._fresh
            self._fresh += 1
        slot = &self._slots[s]
        slot.hash = h
        slot.klen = <uint8_t>n
        memcpy(slot.key, PyBytes_AS_STRING(key), n)
        Py_INCREF(value)
        slot.value = <PyObject*>value
        self._index[b] = s + 1
        self._append(s)
        self._count += 1

    def pop(self, bytes key):
        cdef int32_t s = self._find(key)
        if s < 0:
            return None
        return self._remove(s)

    def pop_oldest(self):
        cdef int32_t s = self._oldest
        if s < 0:
            raise KeyError("the table is empty")
        key = PyBytes_FromStringAndSize(<char*>self._slots[s].key, self._slots[s].klen)
        return key, self._remove(s)

    def values(self):
        cdef list out = []
        cdef int32_t s = self._oldest
        while s >= 0:
            out.append(<object>self._slots[s].value)
            s = self._slots[s].newer
        return out

    def clear(self):
        self._release_all()
        cdef uint32_t i
        for i in range(self._mask + 1):
            self._index[i] = 0
        self._count = 0
        self._fresh = 0  # the slots stay allocated: a cleared cache fills again
        self._free = -1
        self._oldest = -1
        self._newest = -1
