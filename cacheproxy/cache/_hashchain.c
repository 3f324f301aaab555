/* The prefix hash chain of cacheproxy.cache.hashing in C, and two loops of a request's admission
 * that run over every token or every block of a long prompt (cacheproxy.cache.fastpath).
 *
 * h_i = XXH3_128(h_{i-1} || int32-LE ids of block i, seed), digests in xxHash's canonical
 * (big-endian) form, so every byte equals python-xxhash's xxh3_128_digest(data, seed). The chain is
 * sequential, so the only way to make it fast is to take the per-block interpreter overhead away:
 * one call runs the whole loop, with the GIL released while it hashes.
 *
 * token_bounds and resident_prefix touch Python objects throughout, so they hold the GIL; each has a
 * Python twin in fastpath.py that gives the same results and raises the same exception types.
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

static PyObject *str_parent, *str_token_ids;

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

/* a == b for two exact ints without a call per operand: 1 or 0, or -1 when they are too large to
 * compare here (the caller then compares them as objects). */
static inline int
exact_ints_equal(PyObject *a, PyObject *b)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyUnstable_Long_IsCompact((PyLongObject *)a) && PyUnstable_Long_IsCompact((PyLongObject *)b)) {
        return PyUnstable_Long_CompactValue((PyLongObject *)a) == PyUnstable_Long_CompactValue((PyLongObject *)b);
    }
    return -1;
#else
    /* 3.11: ob_size is the signed digit count of a normalized int, so one digit decides. */
    Py_ssize_t size = Py_SIZE(a);
    if (size != Py_SIZE(b)) {
        return 0;
    }
    if (size == 0) {
        return 1;
    }
    if (size == 1 || size == -1) {
        return ((PyLongObject *)a)->ob_digit[0] == ((PyLongObject *)b)->ob_digit[0];
    }
    return -1;
#endif
}

/* `ident_tokens == tuple(tokens[lo:hi])`, without building the tuple when ident_tokens is a tuple
 * (the same element-wise comparison tuple equality makes). */
static int
tokens_equal(PyObject *ident_tokens, PyObject *tokens, Py_ssize_t lo, Py_ssize_t hi)
{
    if (!PyTuple_CheckExact(ident_tokens)) {
        PyObject *block = PyTuple_New(hi - lo);
        if (block == NULL) {
            return -1;
        }
        for (Py_ssize_t k = lo; k < hi; k++) {
            PyObject *item = PySequence_Fast_GET_ITEM(tokens, k);
            Py_INCREF(item);
            PyTuple_SET_ITEM(block, k - lo, item);
        }
        int eq = objects_equal(ident_tokens, block);
        Py_DECREF(block);
        return eq;
    }
    if (PyTuple_GET_SIZE(ident_tokens) != hi - lo) {
        return 0;
    }
    for (Py_ssize_t k = lo; k < hi; k++) {
        if (k >= PySequence_Fast_GET_SIZE(tokens)) {
            return 0; /* an element's __eq__ shrank the list: nothing verified past its end */
        }
        PyObject *a = PyTuple_GET_ITEM(ident_tokens, k - lo), *b = PySequence_Fast_GET_ITEM(tokens, k);
        if (a == b) {
            continue;
        }
        if (PyLong_CheckExact(a) && PyLong_CheckExact(b)) {
            int eq = exact_ints_equal(a, b);
            if (eq >= 0) {
                if (!eq) {
                    return 0;
                }
                continue;
            }
        }
        Py_INCREF(a);
        Py_INCREF(b);
        int eq = PyObject_RichCompareBool(a, b, Py_EQ);
        Py_DECREF(a);
        Py_DECREF(b);
        if (eq != 1) {
            return eq;
        }
    }
    return 1;
}

/* BlockPool.lookup's check of block `index` of the chain: 1, 0, or -1 with an exception. */
static int
identity_matches(PyObject *ident, PyObject *parent, PyObject *tokens, Py_ssize_t index, Py_ssize_t block_size)
{
    PyObject *ident_parent = PyObject_GetAttr(ident, str_parent);
    if (ident_parent == NULL) {
        return -1;
    }
    int eq;
    if (PyBytes_CheckExact(ident_parent) && PyBytes_CheckExact(parent)) {
        Py_ssize_t len = PyBytes_GET_SIZE(parent);
        eq = PyBytes_GET_SIZE(ident_parent) == len
             && memcmp(PyBytes_AS_STRING(ident_parent), PyBytes_AS_STRING(parent), (size_t)len) == 0;
    }
    else {
        eq = objects_equal(ident_parent, parent);
    }
    Py_DECREF(ident_parent);
    if (eq != 1) {
        return eq;
    }
    /* tokens[index * bs : (index + 1) * bs], clamped to the sequence without overflowing. */
    Py_ssize_t n = PySequence_Fast_GET_SIZE(tokens);
    Py_ssize_t lo = index > n / block_size ? n : index * block_size;
    lo = lo < n ? lo : n;
    Py_ssize_t hi = block_size > n - lo ? n : lo + block_size;
    PyObject *ident_tokens = PyObject_GetAttr(ident, str_token_ids);
    if (ident_tokens == NULL) {
        return -1;
    }
    eq = tokens_equal(ident_tokens, tokens, lo, hi);
    Py_DECREF(ident_tokens);
    return eq;
}

/* The position `key` names in `list`, as list[key] reads it (negative from the end); -1 with an
 * exception when there is none. */
static Py_ssize_t
list_position(PyObject *list, PyObject *key)
{
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) {
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
"resident_prefix(hashes, token_ids, root, block_size, by_hash, identity, ref_counts=None, free=None)\n"
"    -> list[int]\n"
"\n"
"The pool blocks of the leading run of `hashes` that the pool holds and that pass BlockPool.lookup's\n"
"check: block i is by_hash[hashes[i]], identity[block] is not None, its .parent == hashes[i-1]\n"
"(`root` for i = 0) and its .token_ids == tuple(token_ids[i*bs:(i+1)*bs]). With `ref_counts` and\n"
"`free` (the pool's lists), each of those blocks is then acquired once, as BlockPool.acquire does.");

static PyObject *
resident_prefix(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *hashes_obj, *tokens_obj, *root, *by_hash, *identity;
    PyObject *ref_counts = Py_None, *free_blocks = Py_None;
    Py_ssize_t block_size;
    if (!PyArg_ParseTuple(args, "OOOnO!O!|OO:resident_prefix", &hashes_obj, &tokens_obj, &root, &block_size,
                          &PyDict_Type, &by_hash, &PyList_Type, &identity, &ref_counts, &free_blocks)) {
        return NULL;
    }
    if (block_size < 1) {
        PyErr_Format(PyExc_ValueError, "block_size must be >= 1, got %zd", block_size);
        return NULL;
    }
    int take_refs = ref_counts != Py_None;
    if (take_refs != (free_blocks != Py_None)) {
        PyErr_SetString(PyExc_TypeError, "ref_counts and free are given together or not at all");
        return NULL;
    }
    if (take_refs && !PyList_Check(ref_counts)) {
        PyErr_SetString(PyExc_TypeError, "ref_counts must be a list");
        return NULL;
    }
    PyObject *hashes = NULL, *tokens = NULL, *blocks = NULL, *parent = NULL;
    PyObject *h = NULL, *block = NULL, *ident = NULL;
    if ((hashes = PySequence_Fast(hashes_obj, "hashes must be a sequence")) == NULL
        || (tokens = PySequence_Fast(tokens_obj, "token ids must be a sequence")) == NULL
        || (blocks = PyList_New(0)) == NULL) {
        goto error;
    }
    Py_INCREF(root);
    parent = root;
    /* Every object is held by a reference of ours while it is used: a comparison of objects that are
     * not ints or bytes may run Python code that changes the lists and the dict. */
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
        int ok = identity_matches(ident, parent, tokens, i, block_size);
        if (ok < 0 || (ok && PyList_Append(blocks, block) < 0)) {
            goto error;
        }
        if (!ok) {
            break;
        }
        Py_SETREF(parent, h);
        h = NULL;
        Py_CLEAR(block);
        Py_CLEAR(ident);
    }
    Py_CLEAR(h);
    Py_CLEAR(block);
    Py_CLEAR(ident);
    /* References are taken after the walk: it never reads a count, so this acquires exactly what
     * the per-block loop would, and a failed check leaves no reference behind. */
    if (take_refs && acquire_all(blocks, ref_counts, free_blocks) < 0) {
        goto error;
    }
    Py_DECREF(parent);
    Py_DECREF(tokens);
    Py_DECREF(hashes);
    return blocks;

error:
    Py_XDECREF(h);
    Py_XDECREF(block);
    Py_XDECREF(ident);
    Py_XDECREF(parent);
    Py_XDECREF(blocks);
    Py_XDECREF(tokens);
    Py_XDECREF(hashes);
    return NULL;
}

static PyMethodDef hashchain_methods[] = {
    {"chain", chain, METH_VARARGS, chain_doc},
    {"token_bounds", token_bounds, METH_O, token_bounds_doc},
    {"resident_prefix", resident_prefix, METH_VARARGS, resident_prefix_doc},
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
    if ((str_parent == NULL && (str_parent = PyUnicode_InternFromString("parent")) == NULL)
        || (str_token_ids == NULL && (str_token_ids = PyUnicode_InternFromString("token_ids")) == NULL)) {
        return NULL;
    }
    return PyModule_Create(&hashchain_module);
}
