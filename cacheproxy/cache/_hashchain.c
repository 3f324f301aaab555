/* The prefix hash chain of cacheproxy.cache.hashing in C, and the loops of a request's admission and
 * release that run over every token or every block of a long prompt (cacheproxy.cache.fastpath).
 *
 * h_i = XXH3_128(h_{i-1} || int32-LE ids of block i, seed), digests in xxHash's canonical
 * (big-endian) form, so every byte equals python-xxhash's xxh3_128_digest(data, seed). The chain is
 * sequential, so the only way to make it fast is to take the per-block interpreter overhead away:
 * one call runs the whole loop, with the GIL released while it hashes.
 *
 * The admission loops (pack_token_ids, count_leading_in, resident_prefix, release_all, and the older
 * token_bounds) touch Python objects throughout, so they hold the GIL; each has a Python twin in
 * fastpath.py that gives the same results and raises the same exception types.
 *
 * xxhash.h is compiled in (XXH_INLINE_ALL), so nothing needs linking at build or run time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <stdint.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#define HASH_BYTES 16
/* Below this many blocks, releasing and re-taking the GIL costs more than the hashing it frees. */
#define RELEASE_GIL_FROM_BLOCKS 32

/* Hashes n_blocks blocks of block_bytes each from data into out (n_blocks * 16 bytes). */
static void
hash_chain(const unsigned char *data, Py_ssize_t n_blocks, Py_ssize_t block_bytes,
           const unsigned char *root, uint64_t seed, unsigned char *scratch, unsigned char *out)
{
    /* scratch = parent digest followed by the block's bytes: the exact bytes the Python loop hashes. */
    memcpy(scratch, root, HASH_BYTES);
    for (Py_ssize_t i = 0; i < n_blocks; i++) {
        memcpy(scratch + HASH_BYTES, data + i * block_bytes, (size_t)block_bytes);
        XXH128_hash_t h = XXH3_128bits_withSeed(scratch, (size_t)(HASH_BYTES + block_bytes), seed);
        XXH128_canonical_t canonical;
        XXH128_canonicalFromHash(&canonical, h);
        memcpy(out + i * HASH_BYTES, canonical.digest, HASH_BYTES);
        memcpy(scratch, canonical.digest, HASH_BYTES);
    }
}

/* A list or tuple of ints as int32-LE bytes; the same refusals as the numpy conversion:
 * OverflowError outside int32, TypeError for a non-integer. Returns a PyMem buffer or NULL. */
static unsigned char *
pack_int32_le(PyObject *seq, Py_ssize_t *n_ids)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    unsigned char *buf = PyMem_Malloc(n > 0 ? (size_t)n * 4 : 1);
    if (buf == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        long long v = PyLong_AsLongLong(items[i]);
        if (v == -1 && PyErr_Occurred()) {
            PyMem_Free(buf);
            return NULL;
        }
        if (v < INT32_MIN || v > INT32_MAX) {
            PyMem_Free(buf);
            PyErr_Format(PyExc_OverflowError, "token id %lld outside int32", v);
            return NULL;
        }
        uint32_t u = (uint32_t)(int32_t)v;
        /* Byte by byte so the bytes are little-endian on any host; compilers fuse this into one store. */
        buf[4 * i] = (unsigned char)u;
        buf[4 * i + 1] = (unsigned char)(u >> 8);
        buf[4 * i + 2] = (unsigned char)(u >> 16);
        buf[4 * i + 3] = (unsigned char)(u >> 24);
    }
    *n_ids = n;
    return buf;
}

PyDoc_STRVAR(chain_doc,
"chain(data, block_size, root, seed) -> list[bytes]\n"
"\n"
"The 16-byte digests of every full block of `data`, chained from `root`.\n"
"`data` is a bytes-like object of int32-LE token ids, or a list/tuple of ints (packed here, which\n"
"is faster than any conversion in Python). A partial last block is left out.");

static PyObject *
chain(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *data_obj, *seed_obj;
    Py_ssize_t block_size;
    Py_buffer root;
    if (!PyArg_ParseTuple(args, "Ony*O:chain", &data_obj, &block_size, &root, &seed_obj)) {
        return NULL;
    }
    PyObject *result = NULL;
    Py_buffer data = {0};
    PyObject *seq = NULL;
    unsigned char *packed = NULL, *work = NULL;
    const unsigned char *ids;
    Py_ssize_t n_ids;

    if (root.len != HASH_BYTES) {
        PyErr_Format(PyExc_ValueError, "root must be %d bytes, got %zd", HASH_BYTES, root.len);
        goto done;
    }
    if (block_size < 1) {
        PyErr_Format(PyExc_ValueError, "block_size must be >= 1, got %zd", block_size);
        goto done;
    }
    uint64_t seed = PyLong_AsUnsignedLongLong(seed_obj);
    if (seed == (uint64_t)-1 && PyErr_Occurred()) {
        goto done;
    }
    if (PyList_Check(data_obj) || PyTuple_Check(data_obj)) {
        seq = PySequence_Fast(data_obj, "token ids must be a sequence");
        if (seq == NULL || (packed = pack_int32_le(seq, &n_ids)) == NULL) {
            goto done;
        }
        ids = packed;
    }
    else {
        if (PyObject_GetBuffer(data_obj, &data, PyBUF_C_CONTIGUOUS) < 0) {
            goto done;
        }
        if (data.len % 4 != 0) {
            PyErr_Format(PyExc_ValueError, "data must be whole int32 ids, got %zd bytes", data.len);
            goto done;
        }
        ids = data.buf;
        n_ids = data.len / 4;
    }

    if (block_size > (PY_SSIZE_T_MAX - HASH_BYTES) / 4 - 1) {
        PyErr_SetString(PyExc_OverflowError, "block_size too large");
        goto done;
    }
    /* n_blocks * 16 <= n_ids * 4, the size of memory that already exists: no overflow below. */
    Py_ssize_t n_blocks = n_ids / block_size;
    Py_ssize_t block_bytes = 4 * block_size;
    /* One allocation: the digests, then the scratch buffer of one hash input. */
    work = PyMem_Malloc((size_t)(n_blocks * HASH_BYTES + HASH_BYTES + block_bytes));
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    unsigned char *out = work, *scratch = work + n_blocks * HASH_BYTES;
    if (n_blocks >= RELEASE_GIL_FROM_BLOCKS) {
        Py_BEGIN_ALLOW_THREADS
        hash_chain(ids, n_blocks, block_bytes, root.buf, seed, scratch, out);
        Py_END_ALLOW_THREADS
    }
    else {
        hash_chain(ids, n_blocks, block_bytes, root.buf, seed, scratch, out);
    }

    result = PyList_New(n_blocks);
    if (result == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < n_blocks; i++) {
        PyObject *digest = PyBytes_FromStringAndSize((const char *)out + i * HASH_BYTES, HASH_BYTES);
        if (digest == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, digest);
    }

done:
    PyMem_Free(work);
    PyMem_Free(packed);
    Py_XDECREF(seq);
    if (data.obj != NULL) {
        PyBuffer_Release(&data);
    }
    PyBuffer_Release(&root);
    return result;
}

/* --- admission loops -------------------------------------------------------------------------- */

PyDoc_STRVAR(token_bounds_doc,
"token_bounds(ids) -> (min, max)\n"
"\n"
"The smallest and largest of a non-empty sequence of integers (ints or anything with __index__).\n"
"TypeError at the first item that is not an integer; failing that, OverflowError when an item is\n"
"outside int64; ValueError when `ids` is empty.");

static PyObject *
token_bounds(PyObject *Py_UNUSED(module), PyObject *ids)
{
    PyObject *seq = PySequence_Fast(ids, "token ids must be a sequence");
    if (seq == NULL) {
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(seq) == 0) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "token_bounds() of an empty sequence");
        return NULL;
    }
    long long lo = LLONG_MAX, hi = LLONG_MIN;
    /* Overflow is reported only after the scan, so that a later non-integer wins, as in the Python
     * twin (which converts every item before it compares). */
    int overflowed = 0;
    /* The size is read again each time: an __index__ may shrink the list. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        int overflow;
        long long v;
        if (PyLong_CheckExact(item)) {
            v = PyLong_AsLongLongAndOverflow(item, &overflow);
        }
        else {
            Py_INCREF(item);
            PyObject *index = PyNumber_Index(item);
            Py_DECREF(item);
            if (index == NULL) {
                Py_DECREF(seq);
                return NULL;
            }
            v = PyLong_AsLongLongAndOverflow(index, &overflow);
            Py_DECREF(index);
        }
        if (overflow) {
            overflowed = 1;
            continue;
        }
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    Py_DECREF(seq);
    if (overflowed) {
        PyErr_SetString(PyExc_OverflowError, "token id outside int64");
        return NULL;
    }
    return Py_BuildValue("(LL)", lo, hi);
}

static PyObject *str_key, *str_move_to_end, *kwnames_last;

/* `a == b` as a condition evaluates it: 1, 0, or -1 with an exception. */
static int
objects_equal(PyObject *a, PyObject *b)
{
    PyObject *r = PyObject_RichCompare(a, b, Py_EQ);
    if (r == NULL) {
        return -1;
    }
    int eq = PyObject_IsTrue(r);
    Py_DECREF(r);
    return eq;
}

/* The value of an exact int of one digit or none, read without a call: 1, or 0 when the caller must
 * ask Python. Such a value is below 2**30 in magnitude, so it fits int32. */
static inline int
small_int_value(PyObject *v, long long *out)
{
    if (!PyLong_CheckExact(v)) {
        return 0;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyUnstable_Long_IsCompact((PyLongObject *)v)) {
        return 0;
    }
    *out = (long long)PyUnstable_Long_CompactValue((PyLongObject *)v);
    return 1;
#else
    /* 3.11: ob_size is the signed digit count of a normalized int. */
    Py_ssize_t size = Py_SIZE(v);
    if (size < -1 || size > 1) {
        return 0;
    }
    *out = size == 0 ? 0 : (long long)size * (long long)((PyLongObject *)v)->ob_digit[0];
    return 1;
#endif
}

static inline void
store_int32_le(unsigned char *p, long long v)
{
    uint32_t u = (uint32_t)(int32_t)v;
    p[0] = (unsigned char)u;
    p[1] = (unsigned char)(u >> 8);
    p[2] = (unsigned char)(u >> 16);
    p[3] = (unsigned char)(u >> 24);
}

PyDoc_STRVAR(pack_token_ids_doc,
"pack_token_ids(ids) -> (list[int], bytes, min, max)\n"
"\n"
"A list copy of a non-empty sequence of integers (ints or anything with __index__), its ids as\n"
"int32-LE bytes, and their smallest and largest value, in one pass. The copy is taken before any\n"
"__index__ runs, and the bytes are made from it. TypeError at the first item that is not an integer;\n"
"failing that, OverflowError when an item is outside int32; ValueError when `ids` is empty.");

static PyObject *
pack_token_ids(PyObject *Py_UNUSED(module), PyObject *ids)
{
    /* A list or tuple is copied in the same pass that packs it (each int is read once). Only an item
     * that is not a small exact int can run Python code (its __index__), so the rest of the copy is
     * taken before the first such item is converted: the copy is then a snapshot, as list(ids) is. */
    const int live = PyList_CheckExact(ids) || PyTuple_CheckExact(ids);
    Py_ssize_t n;
    PyObject *copy;
    if (live) {
        n = PySequence_Fast_GET_SIZE(ids);
        copy = PyList_New(n);
    }
    else {
        copy = PySequence_List(ids);
        n = copy == NULL ? 0 : PyList_GET_SIZE(copy);
    }
    if (copy == NULL) {
        return NULL;
    }
    if (n == 0) {
        Py_DECREF(copy);
        PyErr_SetString(PyExc_ValueError, "pack_token_ids() of an empty sequence");
        return NULL;
    }
    /* n pointers exist, so 4 * n bytes cannot overflow. */
    PyObject *packed = PyBytes_FromStringAndSize(NULL, 4 * n);
    if (packed == NULL) {
        Py_DECREF(copy);
        return NULL;
    }
    unsigned char *out = (unsigned char *)PyBytes_AS_STRING(packed);
    long long lo = LLONG_MAX, hi = LLONG_MIN;
    Py_ssize_t i = 0;
    if (live) {
        /* The common case, every id a small exact int, in one tight loop. */
        PyObject **src = PySequence_Fast_ITEMS(ids), **dst = ((PyListObject *)copy)->ob_item;
        for (; i < n; i++) {
            long long v;
            PyObject *item = src[i];
            if (!small_int_value(item, &v)) {
                break;
            }
            Py_INCREF(item);
            dst[i] = item;
            store_int32_le(out + 4 * i, v);
            lo = v < lo ? v : lo;
            hi = v > hi ? v : hi;
        }
        for (Py_ssize_t k = i; k < n; k++) {
            Py_INCREF(src[k]);
            dst[k] = src[k];
        }
    }
    int overflowed = 0; /* reported after the scan, so that a later non-integer wins */
    for (; i < n; i++) {
        long long v;
        PyObject *item = PyList_GET_ITEM(copy, i); /* held by the copy, which nothing else can reach */
        if (!small_int_value(item, &v)) {
            PyObject *index = PyNumber_Index(item);
            if (index == NULL) {
                Py_DECREF(packed);
                Py_DECREF(copy);
                return NULL;
            }
            int overflow;
            v = PyLong_AsLongLongAndOverflow(index, &overflow);
            Py_DECREF(index);
            if (overflow || v < INT32_MIN || v > INT32_MAX) {
                overflowed = 1;
                continue;
            }
        }
        store_int32_le(out + 4 * i, v);
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    if (overflowed) {
        Py_DECREF(packed);
        Py_DECREF(copy);
        PyErr_SetString(PyExc_OverflowError, "token id outside int32");
        return NULL;
    }
    return Py_BuildValue("(NNLL)", copy, packed, lo, hi);
}

PyDoc_STRVAR(count_leading_in_doc,
"count_leading_in(keys, mapping) -> int\n"
"\n"
"How many leading items of `keys` are keys of the dict `mapping`.");

static PyObject *
count_leading_in(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *keys_obj, *mapping;
    if (!PyArg_ParseTuple(args, "OO!:count_leading_in", &keys_obj, &PyDict_Type, &mapping)) {
        return NULL;
    }
    PyObject *keys = PySequence_Fast(keys_obj, "keys must be a sequence");
    if (keys == NULL) {
        return NULL;
    }
    Py_ssize_t i = 0;
    /* The size is read again each time: a key's __eq__ may change the list. */
    for (; i < PySequence_Fast_GET_SIZE(keys); i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        Py_INCREF(key);
        int found = PyDict_Contains(mapping, key);
        Py_DECREF(key);
        if (found < 0) {
            Py_DECREF(keys);
            return NULL;
        }
        if (!found) {
            break;
        }
    }
    Py_DECREF(keys);
    return PyLong_FromSsize_t(i);
}

/* The position `key` names in `list`, as list[key] reads it (negative from the end); -1 with an
 * exception when there is none. */
static Py_ssize_t
list_position(PyObject *list, PyObject *key)
{
    long long small;
    Py_ssize_t i;
    if (small_int_value(key, &small)) {
        i = (Py_ssize_t)small;
    }
    else if ((i = PyNumber_AsSsize_t(key, PyExc_IndexError)) == -1 && PyErr_Occurred()) {
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (i < 0) {
        i += n;
    }
    if (i < 0 || i >= n) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    return i;
}

/* BlockPool.acquire of every block: `if ref_counts[b] == 0: del free[b]`, then `ref_counts[b] += 1`. */
static int
acquire_all(PyObject *blocks, PyObject *ref_counts, PyObject *free_blocks)
{
    for (Py_ssize_t j = 0; j < PyList_GET_SIZE(blocks); j++) {
        PyObject *block = PyList_GET_ITEM(blocks, j);
        Py_ssize_t b = list_position(ref_counts, block);
        if (b < 0) {
            return -1;
        }
        PyObject *count = PyList_GET_ITEM(ref_counts, b);
        Py_INCREF(count);
        long long v = 0;
        int small = 0, is_zero;
        if (PyLong_CheckExact(count)) {
            int overflow;
            v = PyLong_AsLongLongAndOverflow(count, &overflow);
            small = !overflow && v < LLONG_MAX;
            is_zero = !overflow && v == 0;
        }
        else {
            PyObject *zero = PyLong_FromLong(0);
            is_zero = zero == NULL ? -1 : objects_equal(count, zero);
            Py_XDECREF(zero);
        }
        if (is_zero < 0 || (is_zero && PyObject_DelItem(free_blocks, block) < 0)) {
            Py_DECREF(count);
            return -1;
        }
        PyObject *next;
        if (small) {
            next = PyLong_FromLongLong(v + 1);
        }
        else {
            PyObject *one = PyLong_FromLong(1);
            next = one == NULL ? NULL : PyNumber_InPlaceAdd(count, one);
            Py_XDECREF(one);
        }
        Py_DECREF(count);
        if (next == NULL) {
            return -1;
        }
        b = list_position(ref_counts, block); /* again: `del free[b]` may have run Python code */
        if (b < 0) {
            Py_DECREF(next);
            return -1;
        }
        PyList_SetItem(ref_counts, b, next); /* steals next; cannot fail for a position in range */
    }
    return 0;
}

PyDoc_STRVAR(resident_prefix_doc,
"resident_prefix(hashes, packed, root, block_size, by_hash, identity, ref_counts=None, free=None)\n"
"    -> list[int]\n"
"\n"
"The pool blocks of the leading run of `hashes` that the pool holds and whose identity's key is the\n"
"request's: block i is by_hash[hashes[i]], identity[block] is not None and its .key (bytes) equals\n"
"parent + packed[4*i*bs : 4*(i+1)*bs], parent being hashes[i-1] (`root` for i = 0), which must be\n"
"bytes (TypeError). `packed` holds the request's token ids as int32-LE bytes. With `ref_counts` and\n"
"`free` (the pool's lists), each of those blocks is then acquired once, as BlockPool.acquire does.");

static PyObject *
resident_prefix(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *hashes_obj, *root, *by_hash, *identity;
    PyObject *ref_counts = Py_None, *free_blocks = Py_None;
    Py_buffer packed;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "Oy*OnO!O!|OO:resident_prefix", &hashes_obj, &packed, &root, &block_size,
                          &PyDict_Type, &by_hash, &PyList_Type, &identity, &ref_counts, &free_blocks)) {
        return NULL;
    }
    PyObject *hashes = NULL, *blocks = NULL, *parent = NULL;
    PyObject *h = NULL, *block = NULL, *ident = NULL, *key = NULL;
    if (block_size < 1) {
        PyErr_Format(PyExc_ValueError, "block_size must be >= 1, got %zd", block_size);
        goto error;
    }
    if (packed.len % 4 != 0) {
        PyErr_Format(PyExc_ValueError, "packed must be whole int32 ids, got %zd bytes", packed.len);
        goto error;
    }
    int take_refs = ref_counts != Py_None;
    if (take_refs != (free_blocks != Py_None)) {
        PyErr_SetString(PyExc_TypeError, "ref_counts and free are given together or not at all");
        goto error;
    }
    if (take_refs && !PyList_Check(ref_counts)) {
        PyErr_SetString(PyExc_TypeError, "ref_counts must be a list");
        goto error;
    }
    if ((hashes = PySequence_Fast(hashes_obj, "hashes must be a sequence")) == NULL
        || (blocks = PyList_New(0)) == NULL) {
        goto error;
    }
    const char *ids = packed.buf;
    Py_ssize_t n = packed.len / 4;
    Py_INCREF(root);
    parent = root;
    /* Every object is held by a reference of ours while it is used: a dict lookup of a key that is
     * not exact bytes may run Python code that changes the lists and the dict. */
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(hashes); i++) {
        h = PySequence_Fast_GET_ITEM(hashes, i);
        Py_INCREF(h);
        PyObject *found = PyDict_GetItemWithError(by_hash, h); /* borrowed */
        if (found == NULL && PyErr_Occurred()) {
            goto error;
        }
        if (found == NULL || found == Py_None) {
            break;
        }
        Py_INCREF(found);
        block = found;
        Py_ssize_t b = list_position(identity, block);
        if (b < 0) {
            goto error;
        }
        ident = PyList_GET_ITEM(identity, b);
        Py_INCREF(ident);
        if (ident == Py_None) {
            break;
        }
        if ((key = PyObject_GetAttr(ident, str_key)) == NULL) {
            goto error;
        }
        if (!PyBytes_CheckExact(parent)) {
            PyErr_SetString(PyExc_TypeError, "root and hashes must be bytes");
            goto error;
        }
        /* Block i of the ids, clamped to them without overflowing. */
        Py_ssize_t lo = i > n / block_size ? n : i * block_size;
        lo = lo < n ? lo : n;
        Py_ssize_t hi = block_size > n - lo ? n : lo + block_size;
        Py_ssize_t parent_len = PyBytes_GET_SIZE(parent);
        int ok = PyBytes_CheckExact(key) && PyBytes_GET_SIZE(key) == parent_len + 4 * (hi - lo)
                 && memcmp(PyBytes_AS_STRING(key), PyBytes_AS_STRING(parent), (size_t)parent_len) == 0
                 && memcmp(PyBytes_AS_STRING(key) + parent_len, ids + 4 * lo, (size_t)(4 * (hi - lo))) == 0;
        if (!ok) {
            break;
        }
        if (PyList_Append(blocks, block) < 0) {
            goto error;
        }
        Py_SETREF(parent, h);
        h = NULL;
        Py_CLEAR(block);
        Py_CLEAR(ident);
        Py_CLEAR(key);
    }
    Py_CLEAR(h);
    Py_CLEAR(block);
    Py_CLEAR(ident);
    Py_CLEAR(key);
    /* References are taken after the walk: it never reads a count, so this acquires exactly what
     * the per-block loop would, and a failed check leaves no reference behind. */
    if (take_refs && acquire_all(blocks, ref_counts, free_blocks) < 0) {
        goto error;
    }
    Py_DECREF(parent);
    Py_DECREF(hashes);
    PyBuffer_Release(&packed);
    return blocks;

error:
    Py_XDECREF(h);
    Py_XDECREF(block);
    Py_XDECREF(ident);
    Py_XDECREF(key);
    Py_XDECREF(parent);
    Py_XDECREF(blocks);
    Py_XDECREF(hashes);
    PyBuffer_Release(&packed);
    return NULL;
}

PyDoc_STRVAR(release_all_doc,
"release_all(blocks, ref_counts, free, identity) -> None\n"
"\n"
"BlockPool.release of every block, in order: `ref_counts[b] -= 1`; when it is then 0, `free[b] = None`\n"
"and, for a block whose identity is None, `free.move_to_end(b, last=False)`.");

static PyObject *
release_all(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *blocks_obj, *ref_counts, *free_blocks, *identity;
    if (!PyArg_ParseTuple(args, "OO!OO!:release_all", &blocks_obj, &PyList_Type, &ref_counts, &free_blocks,
                          &PyList_Type, &identity)) {
        return NULL;
    }
    PyObject *blocks = PySequence_Fast(blocks_obj, "blocks must be a sequence");
    if (blocks == NULL) {
        return NULL;
    }
    PyObject *block = NULL;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(blocks); j++) {
        block = PySequence_Fast_GET_ITEM(blocks, j);
        Py_INCREF(block);
        /* ref_counts[block] -= 1 */
        Py_ssize_t b = list_position(ref_counts, block);
        if (b < 0) {
            goto error;
        }
        PyObject *count = PyList_GET_ITEM(ref_counts, b), *next;
        long long v;
        int is_zero;
        if (small_int_value(count, &v)) {
            /* No Python code runs: the count written is the count `== 0` reads next. */
            if ((next = PyLong_FromLongLong(v - 1)) == NULL) {
                goto error;
            }
            PyList_SetItem(ref_counts, b, next); /* steals next; cannot fail for a position in range */
            is_zero = v - 1 == 0;
        }
        else {
            Py_INCREF(count);
            PyObject *one = PyLong_FromLong(1);
            next = one == NULL ? NULL : PyNumber_InPlaceSubtract(count, one);
            Py_XDECREF(one);
            Py_DECREF(count);
            if (next == NULL || (b = list_position(ref_counts, block)) < 0) {
                Py_XDECREF(next);
                goto error;
            }
            PyList_SetItem(ref_counts, b, next);
            /* if ref_counts[block] == 0, read again as Python would */
            if ((b = list_position(ref_counts, block)) < 0) {
                goto error;
            }
            count = PyList_GET_ITEM(ref_counts, b);
            Py_INCREF(count);
            PyObject *zero = PyLong_FromLong(0);
            is_zero = zero == NULL ? -1 : objects_equal(count, zero);
            Py_XDECREF(zero);
            Py_DECREF(count);
            if (is_zero < 0) {
                goto error;
            }
        }
        if (is_zero) {
            if (PyObject_SetItem(free_blocks, block, Py_None) < 0 || (b = list_position(identity, block)) < 0) {
                goto error;
            }
            if (PyList_GET_ITEM(identity, b) == Py_None) {
                PyObject *call_args[] = {free_blocks, block, Py_False};
                PyObject *r = PyObject_VectorcallMethod(str_move_to_end, call_args, 2, kwnames_last);
                if (r == NULL) {
                    goto error;
                }
                Py_DECREF(r);
            }
        }
        Py_CLEAR(block);
    }
    Py_DECREF(blocks);
    Py_RETURN_NONE;

error:
    Py_XDECREF(block);
    Py_DECREF(blocks);
    return NULL;
}

static PyMethodDef hashchain_methods[] = {
    {"chain", chain, METH_VARARGS, chain_doc},
    {"token_bounds", token_bounds, METH_O, token_bounds_doc},
    {"pack_token_ids", pack_token_ids, METH_O, pack_token_ids_doc},
    {"count_leading_in", count_leading_in, METH_VARARGS, count_leading_in_doc},
    {"resident_prefix", resident_prefix, METH_VARARGS, resident_prefix_doc},
    {"release_all", release_all, METH_VARARGS, release_all_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hashchain_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_hashchain",
    .m_doc = "The prefix hash chain of cacheproxy.cache.hashing (XXH3-128, canonical digests) and the "
              "admission loops of cacheproxy.cache.fastpath, in C.",
    .m_size = 0,
    .m_methods = hashchain_methods,
};

PyMODINIT_FUNC
PyInit__hashchain(void)
{
    static PyObject *str_last;
    if ((str_key == NULL && (str_key = PyUnicode_InternFromString("key")) == NULL)
        || (str_move_to_end == NULL && (str_move_to_end = PyUnicode_InternFromString("move_to_end")) == NULL)
        || (str_last == NULL && (str_last = PyUnicode_InternFromString("last")) == NULL)
        || (kwnames_last == NULL && (kwnames_last = PyTuple_Pack(1, str_last)) == NULL)) {
        return NULL;
    }
    return PyModule_Create(&hashchain_module);
}
