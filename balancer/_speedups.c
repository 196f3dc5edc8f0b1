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
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
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

/* fill(loads, rooms, start, count, busy_cost=0) -> (counts, next, placed): dispatch.fill_py in C, for the same
 * arguments the same answer. count picks, one at a time, of the least-loaded link with room, ties going
 * round-robin from start. In Python each pick scanned every worker: with 64 workers that cost more than the
 * connection. With busy_cost > 0 the loads are pick keys (dispatch.pick_key): 2 x (connections, plus
 * busy_cost when requests are in hand), plus 1 when they are; a pick adds a connection (2), and makes a free
 * worker busy (2 x busy_cost + 1). */
static PyObject *
fill(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 4 && nargs != 5) || !PyList_Check(args[0]) || !PyList_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fill(loads: list, rooms: list, start, count, busy_cost=0) takes 4 or 5 arguments");
        return NULL;
    }
    long long busy = 0;
    if (nargs == 5) {
        busy = PyLong_AsLongLong(args[4]);
        if (busy == -1 && PyErr_Occurred())
            return NULL;
        if (busy < 0 || busy > 1 << 20) {
            PyErr_SetString(PyExc_ValueError, "fill: busy_cost out of range");
            return NULL;
        }
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
        if (busy) {
            if (!(loads[best] & 1))
                loads[best] += 2 * busy + 1;
            loads[best] += 2;
        } else {
            loads[best]++;
        }
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

#define BOARD_COUNT 2   /* board.COUNT: requests finished; speedups.py checks these match at import */
#define BOARD_SUM_NS 3  /* board.SUM_NS: their durations added up, in nanoseconds */
#define BOARD_STARTED 496      /* board.STARTED: requests whose handler began */
#define BOARD_FINISHED 497     /* board.FINISHED: of those, the ones that ended */
#define BOARD_STARTED_AT 498   /* board.STARTED_AT: CLOCK_MONOTONIC ns of the latest begin */
#define BOARD_ANSWERED 499     /* board.ANSWERED: the last ASK answered */
#define BOARD_SERVICE_NS 500   /* board.SERVICE_NS: mean request duration over the last window */
#define BOARD_FIRSTS 501       /* board.FIRSTS: requests begun that were the first on their connection */
#define BOARD_RUNNABLE_PER_MILLE 502 /* board.RUNNABLE_PER_MILLE: ns on or waiting for a CPU per 1000 ns of
                                      * request duration, over the last window */
#define BOARD_CPU_NS 503       /* board.CPU_NS: mean CPU time per request over the last window */
#define BOARD_WINDOW 32        /* board.WINDOW: requests per window */
#define BOARD_WINDOW_WAITING 506 /* board.WINDOW_WAITING, _CPU, _COUNT, _SUM: where the window began */
#define BOARD_WINDOW_CPU 508
#define BOARD_WINDOW_COUNT 509
#define BOARD_WINDOW_SUM 510
#define BOARD_CHANNEL_FD 511   /* board.CHANNEL_FD: the worker's channel, where it says it is idle */
#define IDLE 0x49              /* wire.IDLE */
#define BOARD_ASK 504          /* board.ASK: master-written; asked while ASK != ANSWERED */
#define BOARD_ASK_FINISHED 505 /* board.ASK_FINISHED: also answer once FINISHED reaches it (0: idle only) */
#define BOARD_WORDS 512

/* A writable, contiguous memoryview of 8-byte words, at least a board long; NULL with an exception if not. */
static uint64_t *
board_words(PyObject *obj, const char *who, Py_ssize_t *words)
{
    if (!PyMemoryView_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: the board must be a memoryview", who);
        return NULL;
    }
    Py_buffer *view = PyMemoryView_GET_BUFFER(obj);
    if (view->itemsize != 8 || view->readonly || view->ndim != 1 || view->buf == NULL
        || (view->strides != NULL && view->strides[0] != 8)) {
        PyErr_Format(PyExc_ValueError, "%s: the board must be a writable, contiguous memoryview of 8-byte words",
                     who);
        return NULL;
    }
    *words = view->len / 8;
    return (uint64_t *)view->buf;
}

/* board_words() for a whole board (the dispatch words at its end are used); NULL with an exception if not. */
static uint64_t *
whole_board(PyObject *obj, const char *who)
{
    Py_ssize_t words;
    uint64_t *w = board_words(obj, who, &words);
    if (w != NULL && words < BOARD_WORDS) {
        PyErr_Format(PyExc_IndexError, "%s: the board is too short", who);
        return NULL;
    }
    return w;
}

/* The worker's side of an ask: nothing runs any more (or FINISHED reached the asked count), and the master
 * asked: note the answer, then tell it (an IDLE message on the channel; lost only when the channel is full,
 * then the master's hold bounds end the wait). The fence orders the FINISHED store before the ASK load; the master
 * orders its ASK store before its FINISHED load (ask()): one of the two sees the other's store, so a worker
 * going idle just as the master asks is never missed by both. */
static void
answer_ask(uint64_t *w, long long inflight)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t asked = __atomic_load_n(&w[BOARD_ASK], __ATOMIC_RELAXED);
    if (asked == w[BOARD_ANSWERED])
        return;
    uint64_t at = __atomic_load_n(&w[BOARD_ASK_FINISHED], __ATOMIC_RELAXED);
    if (inflight != 0 && !(at && w[BOARD_FINISHED] >= at))
        return;
    __atomic_store_n(&w[BOARD_ANSWERED], asked, __ATOMIC_RELAXED);
    int fd = (int)w[BOARD_CHANNEL_FD];
    if (fd > 0) {
        unsigned char msg = IDLE;
        ssize_t done;
        do {
            done = send(fd, &msg, 1, MSG_DONTWAIT | MSG_NOSIGNAL);
        } while (done < 0 && errno == EINTR);
    }
}

static int schedstat_fd = -2; /* this thread's /proc/thread-self/schedstat, opened at the first window */

/* Nanoseconds this thread has been on a CPU, and waiting for one (runnable, preempted by a neighbour): the
 * kernel's schedstat, whose first two fields are those. Without it, the CPU time alone. */
static int
runnable_ns(uint64_t *on_cpu, uint64_t *waiting)
{
    if (schedstat_fd == -2)
        schedstat_fd = open("/proc/thread-self/schedstat", O_RDONLY | O_CLOEXEC);
    if (schedstat_fd >= 0) {
        char buf[96];
        ssize_t got = pread(schedstat_fd, buf, sizeof buf - 1, 0);
        if (got > 0) { /* "<ns on a CPU> <ns waiting for one> <timeslices>\n" */
            uint64_t value[2] = {0, 0}, field = 0;
            int fields = 0;
            for (ssize_t i = 0; i < got && fields < 2; i++) {
                if (buf[i] >= '0' && buf[i] <= '9') {
                    field = field * 10 + (uint64_t)(buf[i] - '0');
                } else if (i > 0 && buf[i - 1] >= '0' && buf[i - 1] <= '9') {
                    value[fields++] = field;
                    field = 0;
                }
            }
            if (fields == 2) {
                *on_cpu = value[0];
                *waiting = value[1];
                return 0;
            }
        }
    }
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return -1;
    *on_cpu = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    *waiting = 0;
    return 0;
}

/* Every BOARD_WINDOW requests (a file read: not per request): over the window, the mean duration, the mean CPU
 * time, and the time on or waiting for a CPU per 1000 of duration. Handlers that await I/O are runnable a small
 * share of it; CPU-bound ones all of it, also when they share their CPU (the CPU time alone would look like
 * awaiting then). The CPU time per request, not its duration, says how long a request keeps the worker: a
 * preempted one takes longer without doing more. */
static void
close_window(uint64_t *w)
{
    uint64_t on_cpu, waiting;
    if (runnable_ns(&on_cpu, &waiting) != 0)
        return;
    uint64_t count = w[BOARD_COUNT], sum = w[BOARD_SUM_NS];
    uint64_t n = count - w[BOARD_WINDOW_COUNT], duration = sum - w[BOARD_WINDOW_SUM];
    if (w[BOARD_WINDOW_CPU] && n && duration) {
        uint64_t cpu = on_cpu - w[BOARD_WINDOW_CPU];
        __atomic_store_n(&w[BOARD_SERVICE_NS], duration / n, __ATOMIC_RELAXED);
        __atomic_store_n(&w[BOARD_CPU_NS], cpu / n, __ATOMIC_RELAXED);
        __atomic_store_n(&w[BOARD_RUNNABLE_PER_MILLE], (cpu + waiting - w[BOARD_WINDOW_WAITING]) * 1000 / duration,
                         __ATOMIC_RELAXED);
    }
    w[BOARD_WINDOW_CPU] = on_cpu;
    w[BOARD_WINDOW_WAITING] = waiting;
    w[BOARD_WINDOW_COUNT] = count;
    w[BOARD_WINDOW_SUM] = sum;
}

/* begin(board, first=None) -> seconds: a request's handler begins: count it on the board (STARTED, STARTED_AT;
 * FIRSTS too when first is not None: the first request on its connection) and return the time,
 * time.perf_counter()'s clock (CLOCK_MONOTONIC), as perf_counter() would. */
static PyObject *
begin(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1 && nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "begin(board, first=None) takes 1 or 2 arguments");
        return NULL;
    }
    uint64_t *w = whole_board(args[0], "begin");
    if (w == NULL)
        return NULL;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    w[BOARD_STARTED] += 1; /* only this worker writes it; an aligned 8-byte store is whole to the master */
    w[BOARD_STARTED_AT] = ns;
    if (nargs == 2 && args[1] != Py_None)
        w[BOARD_FIRSTS] += 1;
    return PyFloat_FromDouble((double)ns / 1e9);
}

/* ask(board, finished_at) -> (started, finished): the master asks the worker to say (IDLE) when
 * nothing runs any more, or (finished_at > 0) once FINISHED reaches finished_at; then reads where it is, so
 * that the caller sees a worker that went idle just before the ask. A second ask while one is open only
 * moves finished_at. */
static PyObject *
ask(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "ask(board, finished_at) takes 2 arguments");
        return NULL;
    }
    uint64_t *w = whole_board(args[0], "ask");
    if (w == NULL)
        return NULL;
    unsigned long long at = PyLong_AsUnsignedLongLong(args[1]);
    if (at == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    __atomic_store_n(&w[BOARD_ASK_FINISHED], (uint64_t)at, __ATOMIC_RELAXED);
    uint64_t answered = __atomic_load_n(&w[BOARD_ANSWERED], __ATOMIC_RELAXED);
    if (w[BOARD_ASK] == answered) /* not asked yet: a new ask, after the count it may wait for */
        __atomic_store_n(&w[BOARD_ASK], answered + 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t finished = __atomic_load_n(&w[BOARD_FINISHED], __ATOMIC_RELAXED);
    uint64_t started = __atomic_load_n(&w[BOARD_STARTED], __ATOMIC_RELAXED);
    return Py_BuildValue("(KK)", (unsigned long long)started, (unsigned long long)finished);
}

/* tally(board, pair_word, bucket_word, seconds, running=-1): count one finished request on a worker's board
 * (a memoryview of format "Q"): its (method, status) word, its latency bucket word, the duration sum and the
 * count. Four memoryview read-modify-writes from Python cost a worker about 2% of a keep-alive request's
 * instructions; here they are one call. Workers use it when the module is built (balancer_workers/stats.py).
 * running >= 0: how many requests still run (their handlers began and have not ended): FINISHED becomes
 * STARTED - running, and a worker asked to say when it is idle says so (answer_ask). */
static PyObject *
tally(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if ((nargs != 4 && nargs != 5) || !PyMemoryView_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tally(board: memoryview, pair_word, bucket_word, seconds, running=-1)");
        return NULL;
    }
    Py_ssize_t words;
    uint64_t *w = board_words(args[0], "tally", &words);
    if (w == NULL)
        return NULL;
    long long running = -1;
    if (nargs == 5) {
        running = PyLong_AsLongLong(args[4]);
        if (running == -1 && PyErr_Occurred())
            return NULL;
        if (running >= 0 && words < BOARD_WORDS) {
            PyErr_SetString(PyExc_IndexError, "tally: the board is too short");
            return NULL;
        }
    }
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
    /* Plain stores: only this worker writes these words; an aligned 8-byte store is whole to the master. */
    w[pair] += 1;
    w[bucket] += 1;
    if (seconds > 0)
        w[BOARD_SUM_NS] += (uint64_t)(seconds * 1e9);
    w[BOARD_COUNT] += 1;
    if (running >= 0 && (w[BOARD_COUNT] % BOARD_WINDOW == 0 || !w[BOARD_WINDOW_CPU]))
        close_window(w);
    if (running >= 0) {
        __atomic_store_n(&w[BOARD_FINISHED], w[BOARD_STARTED] - (uint64_t)running, __ATOMIC_RELAXED);
        answer_ask(w, running);
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"accept_many", (PyCFunction)(void (*)(void))accept_many, METH_FASTCALL,
     "accept_many(sock, limit) -> (fds, errno): accept up to limit connections."},
    {"send_handoff", (PyCFunction)(void (*)(void))send_handoff, METH_FASTCALL,
     "send_handoff(channel, ids, families, fds): send one hand-off message with its fds."},
    {"close_fds", close_fds, METH_O, "close_fds(fds): close every fd, ignoring ones already gone."},
    {"tally", (PyCFunction)(void (*)(void))tally, METH_FASTCALL,
     "tally(board, pair_word, bucket_word, seconds, running=-1): count one finished request on a worker's board."},
    {"begin", (PyCFunction)(void (*)(void))begin, METH_FASTCALL,
     "begin(board, first=None) -> seconds: count a request's handler beginning; return the time."},
    {"ask", (PyCFunction)(void (*)(void))ask, METH_FASTCALL,
     "ask(board, finished_at) -> (started, finished): ask a worker to wake the master when it is idle."},
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL,
     "fill(loads, rooms, start, count, busy_cost=0) -> (counts, next, placed): the least-loaded picks of a batch."},
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
                           || PyModule_AddIntConstant(module, "BOARD_SUM_NS", BOARD_SUM_NS) < 0
                           || PyModule_AddIntConstant(module, "BOARD_STARTED", BOARD_STARTED) < 0
                           || PyModule_AddIntConstant(module, "BOARD_ASK", BOARD_ASK) < 0
                           || PyModule_AddIntConstant(module, "BOARD_CHANNEL_FD", BOARD_CHANNEL_FD) < 0
                           || PyModule_AddIntConstant(module, "IDLE", IDLE) < 0
                           || PyModule_AddIntConstant(module, "BOARD_WINDOW_SUM", BOARD_WINDOW_SUM) < 0
                           || PyModule_AddIntConstant(module, "BOARD_RUNNABLE_PER_MILLE", BOARD_RUNNABLE_PER_MILLE) < 0
                           || PyModule_AddIntConstant(module, "BOARD_FIRSTS", BOARD_FIRSTS) < 0
                           || PyModule_AddIntConstant(module, "BOARD_CPU_NS", BOARD_CPU_NS) < 0)) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
