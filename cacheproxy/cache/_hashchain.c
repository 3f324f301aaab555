/* The prefix hash chain of cacheproxy.cache.hashing in C.
 *
 * h_i = XXH3_128(h_{i-1} || int32-LE ids of block i, seed), digests in xxHash's canonical
 * (big-endian) form, so every byte equals python-xxhash's xxh3_128_digest(data, seed). The chain is
 * sequential, so the only way to make it fast is to take the per-block interpreter overhead away:
 * one call runs the whole loop, with the GIL released while it hashes.
 *
 * xxhash.h is compiled in (XXH_INLINE_ALL), so nothing needs linking at build or run time.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

static PyMethodDef hashchain_methods[] = {
    {"chain", chain, METH_VARARGS, chain_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef hashchain_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_hashchain",
    .m_doc = "The prefix hash chain of cacheproxy.cache.hashing, in C (XXH3-128, canonical digests).",
    .m_size = 0,
    .m_methods = hashchain_methods,
};

PyMODINIT_FUNC
PyInit__hashchain(void)
{
    return PyModule_Create(&hashchain_module);
}
