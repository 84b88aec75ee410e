/* BLAKE3 chaining values of subtrees, for sums that are updated from the
 * changed parts of a file (b3tree.py).
 *
 * BLAKE3 is a tree hash: the sum of a file is the root of a binary tree over
 * its 1 KiB chunks, whose inner nodes ("chaining values") can be kept and
 * combined again.  Python's blake3 module (and the C library's public API)
 * only give the root of an input that starts at offset 0.  This module
 * compiles the reference C implementation that Debian ships
 * (librust-blake3-dev) into itself and uses its own internal functions, as
 * the Rust crate's `hazmat` module does since 1.8:
 *
 *   subtree_cv(data, chunk_counter, root=False)  the chaining value of a
 *       subtree: `data` is a power-of-two number of whole chunks starting at
 *       chunk `chunk_counter`, or the file's last piece (at least one byte);
 *       with `root`, the sum of `data` as the whole input (chunk 0);
 *   merge(cvs, root)  the tree over consecutive subtrees of equal size (the
 *       last may be shorter), each given by its 32-byte chaining value:
 *       the root sum when `root` is true (two subtrees at least), else the
 *       chaining value of the whole.
 *
 * Both release the GIL, so leaves are hashed side by side in threads.
 * Results are tested against the blake3 module and b3sum
 * (tests/unit/test_b3tree.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "blake3.c"

static void subtree(const uint8_t *input, size_t len, uint64_t counter, int root,
                    uint8_t out[BLAKE3_OUT_LEN]) {
  output_t output;
  if (len <= BLAKE3_CHUNK_LEN) {
    blake3_chunk_state state;
    chunk_state_init(&state, IV, 0);
    state.chunk_counter = counter;
    chunk_state_update(&state, input, len);
    output = chunk_state_output(&state);
  } else {
    uint8_t block[BLAKE3_BLOCK_LEN];
    compress_subtree_to_parent_node(input, len, IV, counter, 0, block);
    output = parent_output(block, IV, 0);
  }
  if (root)
    output_root_bytes(&output, 0, out, BLAKE3_OUT_LEN);
  else
    output_chaining_value(&output, out);
}

/* The tree over `count` >= 2 chaining values: left-complete, as BLAKE3's
 * own (the left side is the largest power of two that is less than count). */
static void merge_cvs(const uint8_t *cvs, size_t count, int root, uint8_t out[BLAKE3_OUT_LEN]) {
  uint8_t block[BLAKE3_BLOCK_LEN];
  size_t left = (size_t)round_down_to_power_of_2((uint64_t)(count - 1));
  if (left == 1)
    memcpy(block, cvs, BLAKE3_OUT_LEN);
  else
    merge_cvs(cvs, left, 0, block);
  if (count - left == 1)
    memcpy(block + BLAKE3_OUT_LEN, cvs + left * BLAKE3_OUT_LEN, BLAKE3_OUT_LEN);
  else
    merge_cvs(cvs + left * BLAKE3_OUT_LEN, count - left, 0, block + BLAKE3_OUT_LEN);
  output_t output = parent_output(block, IV, 0);
  if (root)
    output_root_bytes(&output, 0, out, BLAKE3_OUT_LEN);
  else
    output_chaining_value(&output, out);
}

static PyObject *py_subtree_cv(PyObject *self, PyObject *args) {
  Py_buffer data;
  unsigned long long counter;
  int root = 0;
  uint8_t out[BLAKE3_OUT_LEN];
  (void)self;
  if (!PyArg_ParseTuple(args, "y*K|p", &data, &counter, &root))
    return NULL;
  if (root ? counter != 0 : data.len <= 0) {
    PyBuffer_Release(&data);
    PyErr_SetString(PyExc_ValueError, root ? "a root starts at chunk 0"
                                           : "a subtree holds at least one byte");
    return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  subtree((const uint8_t *)data.buf, (size_t)data.len, (uint64_t)counter, root, out);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&data);
  return PyBytes_FromStringAndSize((const char *)out, BLAKE3_OUT_LEN);
}

static PyObject *py_merge(PyObject *self, PyObject *args) {
  Py_buffer cvs;
  int root;
  uint8_t out[BLAKE3_OUT_LEN];
  (void)self;
  if (!PyArg_ParseTuple(args, "y*p", &cvs, &root))
    return NULL;
  if (cvs.len % BLAKE3_OUT_LEN || cvs.len < 2 * BLAKE3_OUT_LEN) {
    PyBuffer_Release(&cvs);
    PyErr_SetString(PyExc_ValueError, "merge takes two or more 32-byte chaining values");
    return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  merge_cvs((const uint8_t *)cvs.buf, (size_t)cvs.len / BLAKE3_OUT_LEN, root, out);
  Py_END_ALLOW_THREADS
  PyBuffer_Release(&cvs);
  return PyBytes_FromStringAndSize((const char *)out, BLAKE3_OUT_LEN);
}

static PyMethodDef methods[] = {
    {"subtree_cv", py_subtree_cv, METH_VARARGS,
     "subtree_cv(data, chunk_counter, root=False) -> 32-byte chaining value (or root sum)"},
    {"merge", py_merge, METH_VARARGS,
     "merge(cvs, root) -> the root sum (root true) or chaining value of consecutive subtrees"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_b3tree",
    "BLAKE3 chaining values of subtrees (the reference C implementation)", -1, methods,
};

PyMODINIT_FUNC PyInit__b3tree(void) {
  PyObject *m = PyModule_Create(&module);
  if (m && PyModule_AddIntConstant(m, "CHUNK_LEN", BLAKE3_CHUNK_LEN) < 0) {
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
