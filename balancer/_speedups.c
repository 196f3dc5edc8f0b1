/* The master's per-connection work in C: accept a batch, pick workers, send a hand-off, close its copies.
 *
 * balancer/handoff.py holds the same three functions in Python and picks this module when it is built.
 * In Python the master spent about half its CPU outside the kernel per new connection: socket._accept
 * formats the peer address it never reads, the EAGAIN that ends each batch becomes a BlockingIOError, and
 * sendmsg parses its ancillary data item by item. Here each costs a loop iteration around the syscall.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_FDS 64     /* must equal wire.MAX_FDS_PER_MSG; handoff.py checks it at import */
#define HANDOFF 0x48   /* wire.HANDOFF */
#define HEADER 3       /* type byte, then the count as a little-endian uint16 (wire._COUNT, "<BH") */
/* Linux allocates the new socket and its file before it looks at the accept queue, so an accept that finds
 * the queue empty costs as much as one that succeeds (5.3 us here), and ends every batch. poll() reads the
 * queue without locking the listener (0.5 us): for the first POLLED_ACCEPTS of a batch it asks first. */
#define POLLED_ACCEPTS 8

/* accept_many(sock, limit) -> (fds, errno): accept up to limit connections, close-on-exec.
 * errno is 0 when limit was reached, EAGAIN when the backlog ran dry, or the error that stopped the batch.
 * The first accept is not polled: the caller was told the listener is readable. */
static PyObject *
accept_many(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "accept_many(sock, limit) takes 2 arguments");
        return NULL;
    }
    int fd = PyObject_AsFileDescriptor(args[0]);
    if (fd < 0)
        return NULL;
    Py_ssize_t limit = PyLong_AsSsize_t(args[1]);
    if (limit == -1 && PyErr_Occurred())
        return NULL;
    PyObject *fds = PyList_New(0);
    if (fds == NULL)
        return NULL;
    int err = 0;
    while (PyList_GET_SIZE(fds) < limit) {
        Py_ssize_t got = PyList_GET_SIZE(fds);
        if (got > 0 && got <= POLLED_ACCEPTS) {
            struct pollfd ask = {fd, POLLIN, 0};
            int ready = poll(&ask, 1, 0);
            if (ready == 0) {
                err = EAGAIN;
                break;
            }
            /* ready < 0 (EINTR, ENOMEM): let accept4 answer instead */
        }
        int conn = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR)
                continue; /* a non-blocking accept: nothing to wait for, just retry */
            err = errno == EWOULDBLOCK ? EAGAIN : errno;
            break;
        }
        PyObject *item = PyLong_FromLong(conn);
        if (item == NULL || PyList_Append(fds, item) < 0) {
            Py_XDECREF(item);
            close(conn);
            for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++)
                close((int)PyLong_AsLong(PyList_GET_ITEM(fds, i)));
            Py_DECREF(fds);
            return NULL;
        }
        Py_DECREF(item);
    }
    return Py_BuildValue("(Ni)", fds, err);
}

/* Copy the first n items of a list of ints into out[]; each must lie in [lo, hi].
 * Converting an item may run Python code (__index__) that changes the list: each item is held while it is
 * converted, and the length is checked again before every read. */
static int
ints_from_list(PyObject *list, const char *what, long long lo, long long hi, long long *out, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        if (i >= PyList_GET_SIZE(list)) {
            PyErr_Format(PyExc_ValueError, "the %s list changed size during the call", what);
            return -1;
        }
        PyObject *item = PyList_GET_ITEM(list, i);
        Py_INCREF(item);
        long long v = PyLong_AsLongLong(item);
        Py_DECREF(item);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (v < lo || v > hi) {
            PyErr_Format(PyExc_ValueError, "%s %lld out of range [%lld, %lld]", what, v, lo, hi);
            return -1;
        }
        out[i] = v;
    }
    return 0;
}

/* send_handoff(channel, ids, families, fds): one HANDOFF message (wire.encode_handoff's bytes) with fds
 * attached. Raises BlockingIOError when the channel is full, OSError when it is broken. */
static PyObject *
send_handoff(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "send_handoff(channel, ids, families, fds) takes 4 arguments");
        return NULL;
    }
    int channel = PyObject_AsFileDescriptor(args[0]);
    if (channel < 0)
        return NULL;
    PyObject *ids = args[1], *families = args[2], *fds = args[3];
    if (!PyList_Check(ids) || !PyList_Check(families) || !PyList_Check(fds)) {
        PyErr_SetString(PyExc_TypeError, "ids, families and fds must be lists");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(ids);
    if (PyList_GET_SIZE(families) != n || PyList_GET_SIZE(fds) != n) {
        PyErr_SetString(PyExc_ValueError, "ids, families and fds differ in length");
        return NULL;
    }
    if (n < 1 || n > MAX_FDS) {
        PyErr_Format(PyExc_ValueError, "a hand-off carries 1 to %d fds, not %zd", MAX_FDS, n);
        return NULL;
    }
    long long values[MAX_FDS];
    unsigned char payload[HEADER + 5 * MAX_FDS];
    payload[0] = HANDOFF;
    payload[1] = (unsigned char)(n & 0xFF);
    payload[2] = (unsigned char)(n >> 8);
    if (ints_from_list(ids, "id", 0, UINT32_MAX, values, n) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t id = (uint32_t)values[i]; /* native order, as array("I").tobytes() */
        memcpy(payload + HEADER + 4 * i, &id, 4);
    }
    if (ints_from_list(families, "family", 0, 255, values, n) < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++)
        payload[HEADER + 4 * n + i] = (unsigned char)values[i];

    union {
        struct cmsghdr align;
        char buf[CMSG_SPACE(sizeof(int) * MAX_FDS)];
    } control;
    memset(&control, 0, sizeof(control));
    if (ints_from_list(fds, "fd", 0, INT32_MAX, values, n) < 0)
        return NULL;
    if (PyList_GET_SIZE(ids) != n || PyList_GET_SIZE(families) != n || PyList_GET_SIZE(fds) != n) {
        /* a conversion above changed a list it had read already: what would go out is not what was asked */
        PyErr_SetString(PyExc_ValueError, "ids, families or fds changed size during the call");
        return NULL;
    }
    struct iovec iov = {payload, (size_t)(HEADER + 5 * n)};
    struct msghdr msg = {0};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * n);
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof(int) * n);
    int *slots = (int *)CMSG_DATA(cmsg);
    for (Py_ssize_t i = 0; i < n; i++) {
        int v = (int)values[i];
        memcpy(slots + i, &v, sizeof(int));
    }
    ssize_t sent;
    do {
        sent = sendmsg(channel, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0)
        return PyErr_SetFromErrno(PyExc_OSError); /* EAGAIN becomes BlockingIOError, as in socket.sendmsg */
    Py_RETURN_NONE;
}

static int
compare_ints(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static int close_range_works = 1; /* cleared on the first ENOSYS: kernels before 5.9 */

/* close_fds(fds): close every fd, ignoring ones already gone. Runs of consecutive numbers, the usual case
 * because the kernel hands out the lowest free fds, take one close_range call each. A list that an
 * __index__ shortens while it is read is closed up to where it ends, as the Python loop does. */
static PyObject *
close_fds(PyObject *module, PyObject *list)
{
    if (!PyList_Check(list)) {
        PyErr_SetString(PyExc_TypeError, "close_fds takes a list of fds");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (n == 0)
        Py_RETURN_NONE;
    int small[256];
    int *fds = n <= 256 ? small : PyMem_New(int, n);
    if (fds == NULL)
        return PyErr_NoMemory();
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n && i < PyList_GET_SIZE(list); i++) {
        PyObject *item = PyList_GET_ITEM(list, i); /* held: converting it may drop the list's reference */
        Py_INCREF(item);
        long v = PyLong_AsLong(item);
        Py_DECREF(item);
        if (v == -1 && PyErr_Occurred()) {
            if (fds != small)
                PyMem_Free(fds);
            return NULL;
        }
        if (v >= 0 && v <= INT32_MAX)
            fds[count++] = (int)v;
    }
    if (count > 1)
        qsort(fds, (size_t)count, sizeof(int), compare_ints);
    for (Py_ssize_t i = 0; i < count;) {
        Py_ssize_t j = i;
        while (j + 1 < count && fds[j + 1] <= fds[j] + 1)
            j++; /* <=: a duplicate stays inside the run */
#ifdef SYS_close_range
        if (j > i && close_range_works) {
            if (syscall(SYS_close_range, (unsigned int)fds[i], (unsigned int)fds[j], 0) == 0) {
                i = j + 1;
                continue;
            }
            if (errno == ENOSYS)
                close_range_works = 0;
        }
#endif
        for (Py_ssize_t k = i; k <= j; k++)
            if (k == i || fds[k] != fds[k - 1])
                close(fds[k]);
        i = j + 1;
    }
    if (fds != small)
        PyMem_Free(fds);
    Py_RETURN_NONE;
}

/* fill(loads, rooms, start, count) -> (counts, next, placed): dispatch.fill_py in C, for the same arguments
 * the same answer. count picks, one at a time, of the least-loaded link with room, ties going round-robin from
 * start. In Python each pick scanned every worker: with 64 workers that cost more than the connection. */
static PyObject *
fill(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fill(loads: list, rooms: list, start, count) takes 4 arguments");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    if (PyList_GET_SIZE(args[1]) != n) {
        PyErr_SetString(PyExc_ValueError, "fill: loads and rooms differ in length");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[2]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[3]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (start < 0 || count < 0) {
        PyErr_SetString(PyExc_ValueError, "fill: start and count must not be negative");
        return NULL;
    }
    long long small[3 * 64];
    long long *buf = n <= 64 ? small : PyMem_New(long long, 3 * (size_t)n);
    if (buf == NULL)
        return PyErr_NoMemory();
    long long *loads = buf, *rooms = buf + n, *counts = buf + 2 * n;
    PyObject *result = NULL;
    if (ints_from_list(args[0], "load", 0, INT32_MAX, loads, n) < 0
        || ints_from_list(args[1], "room", 0, INT32_MAX, rooms, n) < 0)
        goto done;
    memset(counts, 0, sizeof(long long) * (size_t)n);
    Py_ssize_t placed = 0;
    while (placed < count) {
        Py_ssize_t idx = start, best = -1, best_idx = 0;
        long long best_load = 0;
        for (Py_ssize_t k = 0; k < n; k++) {
            if (idx >= n)
                idx = 0;
            Py_ssize_t i = idx++;
            if (rooms[i] > 0 && (best < 0 || loads[i] < best_load)) {
                best = i;
                best_load = loads[i];
                best_idx = idx;
                if (best_load <= 0)
                    break;
            }
        }
        if (best < 0)
            break;
        counts[best]++;
        loads[best]++;
        rooms[best]--;
        start = best_idx;
        placed++;
    }
    PyObject *list = PyList_New(n);
    if (list == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLongLong(counts[i]);
        if (v == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, i, v);
    }
    result = Py_BuildValue("(Nnn)", list, start, placed);
done:
    if (buf != small)
        PyMem_Free(buf);
    return result;
}

#define BOARD_COUNT 2   /* board.COUNT: requests finished; stats.py checks these match at import */
#define BOARD_SUM_NS 3  /* board.SUM_NS: their durations added up, in nanoseconds */

/* tally(board, pair_word, bucket_word, seconds): count one finished request on a worker's board (a memoryview
 * of format "Q"): its (method, status) word, its latency bucket word, the duration sum and the count. Four
 * memoryview read-modify-writes from Python cost a worker about 2% of a keep-alive request's instructions;
 * here they are one call. Workers use it when the module is built (balancer_workers/stats.py). */
static PyObject *
tally(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyMemoryView_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tally(board: memoryview, pair_word, bucket_word, seconds)");
        return NULL;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(args[0]);
    if (view->itemsize != 8 || view->readonly || view->ndim != 1 || view->buf == NULL
        || (view->strides != NULL && view->strides[0] != 8)) {
        PyErr_SetString(PyExc_ValueError, "tally: the board must be a writable, contiguous memoryview of 8-byte words");
        return NULL;
    }
    Py_ssize_t words = view->len / 8;
    Py_ssize_t pair = PyLong_AsSsize_t(args[1]);
    if (pair == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t bucket = PyLong_AsSsize_t(args[2]);
    if (bucket == -1 && PyErr_Occurred())
        return NULL;
    double seconds = PyFloat_AsDouble(args[3]);
    if (seconds == -1.0 && PyErr_Occurred())
        return NULL;
    if (pair <= BOARD_SUM_NS || pair >= words || bucket <= BOARD_SUM_NS || bucket >= words) {
        PyErr_SetString(PyExc_IndexError, "tally: word index out of the board");
        return NULL;
    }
    uint64_t *w = (uint64_t *)view->buf;
    /* Plain stores: only this worker writes these words; an aligned 8-byte store is whole to the master. */
    w[pair] += 1;
    w[bucket] += 1;
    if (seconds > 0)
        w[BOARD_SUM_NS] += (uint64_t)(seconds * 1e9);
    w[BOARD_COUNT] += 1;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"accept_many", (PyCFunction)(void (*)(void))accept_many, METH_FASTCALL,
     "accept_many(sock, limit) -> (fds, errno): accept up to limit connections."},
    {"send_handoff", (PyCFunction)(void (*)(void))send_handoff, METH_FASTCALL,
     "send_handoff(channel, ids, families, fds): send one hand-off message with its fds."},
    {"close_fds", close_fds, METH_O, "close_fds(fds): close every fd, ignoring ones already gone."},
    {"tally", (PyCFunction)(void (*)(void))tally, METH_FASTCALL,
     "tally(board, pair_word, bucket_word, seconds): count one finished request on a worker's board."},
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL,
     "fill(loads, rooms, start, count) -> (counts, next, placed): the least-loaded picks of a batch."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "balancer._speedups", "The master's per-connection syscalls in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    PyObject *module = PyModule_Create(&module_def);
    if (module != NULL && (PyModule_AddIntConstant(module, "MAX_FDS", MAX_FDS) < 0
                           || PyModule_AddIntConstant(module, "BOARD_COUNT", BOARD_COUNT) < 0
                           || PyModule_AddIntConstant(module, "BOARD_SUM_NS", BOARD_SUM_NS) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
