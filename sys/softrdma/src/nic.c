/* softrdma: the emulated NIC.
 *
 * One progress thread per process (started by the first ibv_open_device) does all
 * data movement: it is the only thread that touches sockets, and applications' threads
 * never take part in an RDMA READ or WRITE aimed at their memory.
 *
 * Fabric. Every queue pair listens on an abstract Unix socket named after its QPN
 * ("\0softrdma.<uid>.qp.<qpn>"), so binding the name allocates the QPN host-wide and the
 * kernel frees it when the process dies. A requester connects to its destination QPN the
 * first time it transmits and says who it is (HELLO: QPN, LID, GIDs, MTU); the responder
 * checks that against its own attributes for every message, as a NIC checks packet
 * headers. One connection carries one QP's requests and the peer's responses, in order.
 *
 * Wire. Messages travel as segments of at most SOFTRDMA_SEGMENT bytes, each behind a
 * 64-byte header. Requests carry a PSN; the responder executes a message only when its
 * PSN is the expected one, answers ACK (cumulative), READ response segments, atomic
 * responses, or a NAK (RNR with its timer, PSN sequence error, remote access error,
 * invalid request, remote operation error). A request the responder cannot accept at
 * all (no such QP, a QP not in RTR/RTS, one connected to someone else) is dropped: a
 * real NIC answers nothing and the requester retransmits after its timeout; here the
 * responder says DROP and the requester runs the same timeout and retry count
 * (4.096 us * 2^timeout, retry_cnt retries, then IBV_WC_RETRY_EXC_ERR). A peer process
 * that dies closes its sockets, which is treated the same way.
 *
 * Memory. Payload leaves the initiator (and a READ's responder) through a bounce buffer
 * filled in ascending address order after process_vm_readv on this process proved the
 * range readable (a fault becomes an error completion, never a crash; see copy_out); incoming payload is received straight into registered memory with recv(),
 * after the memory key is looked up again under the MR read lock (ibv_dereg_mr takes the
 * write lock, so after it returns no transfer touches the region).
 *
 * Completions are delivered after a random latency (SOFTRDMA_LATENCY_US), in order per
 * queue, through a timer heap.
 */
#include "soft.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/un.h>
#include <unistd.h>

/* ------------------------------------------------------------------ wire */
enum wire_type {
	W_HELLO = 1,
	W_REQ,	  /* SEND / SEND_IMM / WRITE / WRITE_IMM segment */
	W_READ,	  /* RDMA READ request */
	W_ATOMIC, /* compare-and-swap or fetch-and-add */
	W_ACK,
	W_NAK,
	W_DROP,
	W_RRESP, /* READ response segment */
	W_ARESP, /* atomic response */
};
enum wire_flags { WF_FIRST = 1, WF_LAST = 2, WF_SOLICITED = 4, WF_IMM = 8 };
enum nak_code { NAK_RNR = 1, NAK_SEQ, NAK_REM_ACCESS, NAK_INV_REQ, NAK_REM_OP };
enum req_op { OP_SEND = 1, OP_SEND_IMM, OP_WRITE, OP_WRITE_IMM, OP_CMP_SWAP, OP_FETCH_ADD };

struct wire {
	uint8_t type;
	uint8_t op;
	uint8_t flags;
	uint8_t mtu;
	uint32_t psn;
	uint32_t len; /* payload bytes after this header */
	uint32_t imm;
	uint64_t total;
	uint64_t offset;
	uint64_t va;
	uint32_t rkey;
	uint32_t npkts;
	uint64_t arg1, arg2;
};
_Static_assert(sizeof(struct wire) == 64, "wire header is 64 bytes");

#define HELLO_MAGIC 0x534f4654u /* "SOFT" */
#define HELLO_VERSION 1
struct hello {
	uint32_t magic, version;
	uint32_t src_qpn, dst_qpn;
	uint16_t src_lid, dlid;
	uint8_t is_global, link_layer, mtu, pad;
	uint32_t sgid_type;
	uint8_t sgid[16];
	uint8_t dgid[16];
	uint32_t pid, dev_index;
};

/* ------------------------------------------------------------------ state */
struct ritem { /* a response waiting to be sent */
	struct ritem *next;
	struct wire hdr;
	uint32_t gen; /* the QP generation the request was accepted in */
	int is_read;
	uint64_t va, total, off;
	uint32_t rkey;
};

struct rxmsg {
	int active;
	int discard;
	int op;
	uint32_t psn, npkts, imm;
	uint64_t total;
	int flags;
	uint64_t va; /* WRITE */
	uint32_t rkey;
	int rq; /* SEND / WRITE_IMM: holds the head receive */
	uint32_t gen; /* the QP generation it was accepted in */
};

enum conn_role { ROLE_REQ, ROLE_RESP };

struct conn {
	struct soft_fdh fdh;
	int fd;
	enum conn_role role;
	struct soft_qp *qp;
	uint32_t gen;		  /* ROLE_REQ: the QP generation it was opened in */
	struct soft_list link;	  /* ROLE_RESP: qp->resp_conns */
	/* receive */
	uint8_t rx_hdr[sizeof(struct wire)];
	size_t rx_got;
	struct wire hdr;
	int in_body;
	uint64_t body_left;
	uint64_t body_off; /* offset within the message of the next body byte */
	struct hello peer;
	int have_peer;
	struct rxmsg msg;
	int dropping, drop_sent, nak_seq_sent;
	/* transmit */
	uint8_t *tx_buf;
	size_t tx_len, tx_off;
	struct ritem *q_head, *q_tail;
	int nreads_queued;
	int hello_sent;
	int want_out;
	int dead;
};

enum tkind { T_CQE, T_RETRY, T_RNR, T_KICK };
struct timer {
	uint64_t due, seq;
	enum tkind kind;
	struct soft_qp *qp;
	uint32_t gen;
	struct soft_cq *cq;
	struct ibv_wc wc;
	int solicited;
};

struct cmd {
	struct cmd *next;
	enum { C_REMOVE, C_OVERRUN } kind;
	struct soft_qp *qp;
	struct soft_cq *cq;
	int done;
};

static struct {
	int started;
	int epfd, evfd, tfd;
	struct soft_fdh evh, th;
	pthread_t thread;
	pthread_t self;
	pthread_mutex_t lock; /* work, cmds, heap, all */
	pthread_cond_t cond;
	struct soft_list work;
	struct soft_list all;
	struct cmd *cmds;
	struct timer *heap;
	size_t nheap, capheap;
	uint64_t seq;
	uint64_t armed;
	long faults_rnr, faults_qp_err, faults_drop;
	uint8_t *scratch;
} nic = {.lock = PTHREAD_MUTEX_INITIALIZER, .cond = PTHREAD_COND_INITIALIZER};

static pthread_mutex_t start_lock = PTHREAD_MUTEX_INITIALIZER;
#define SCRATCH (1 << 16)

static int on_nic_thread(void) { return nic.started && pthread_equal(pthread_self(), nic.thread); }

static void wake(void)
{
	uint64_t one = 1;
	ssize_t w = write(nic.evfd, &one, sizeof one);
	(void)w;
}

/* ------------------------------------------------------------------ timer heap */
static void heap_swap(size_t a, size_t b)
{
	struct timer t = nic.heap[a];
	nic.heap[a] = nic.heap[b];
	nic.heap[b] = t;
}
static int heap_less(size_t a, size_t b)
{
	return nic.heap[a].due < nic.heap[b].due ||
	       (nic.heap[a].due == nic.heap[b].due && nic.heap[a].seq < nic.heap[b].seq);
}
static void heap_up(size_t i)
{
	while (i && heap_less(i, (i - 1) / 2)) {
		heap_swap(i, (i - 1) / 2);
		i = (i - 1) / 2;
	}
}
static void heap_down(size_t i)
{
	for (;;) {
		size_t l = 2 * i + 1, r = l + 1, m = i;
		if (l < nic.nheap && heap_less(l, m))
			m = l;
		if (r < nic.nheap && heap_less(r, m))
			m = r;
		if (m == i)
			return;
		heap_swap(i, m);
		i = m;
	}
}
/* Caller holds nic.lock. */
static void heap_push(struct timer *t)
{
	if (nic.nheap == nic.capheap) {
		size_t nc = nic.capheap ? nic.capheap * 2 : 256;
		struct timer *h = realloc(nic.heap, nc * sizeof *h);
		if (!h) {
			soft_warn("out of memory for the timer heap; a completion is lost");
			return;
		}
		nic.heap = h;
		nic.capheap = nc;
	}
	t->seq = nic.seq++;
	nic.heap[nic.nheap] = *t;
	heap_up(nic.nheap++);
}
static void heap_pop(struct timer *out)
{
	*out = nic.heap[0];
	nic.heap[0] = nic.heap[--nic.nheap];
	if (nic.nheap)
		heap_down(0);
}
static void heap_purge_qp(struct soft_qp *qp)
{
	size_t j = 0;
	for (size_t i = 0; i < nic.nheap; i++)
		if (nic.heap[i].qp != qp)
			nic.heap[j++] = nic.heap[i];
	nic.nheap = j;
	for (size_t i = nic.nheap; i-- > 0;)
		heap_down(i);
}

static void add_timer(struct timer *t)
{
	pthread_mutex_lock(&nic.lock);
	heap_push(t);
	int rearm = t->due < nic.armed;
	pthread_mutex_unlock(&nic.lock);
	if (rearm && !on_nic_thread())
		wake();
}

static uint64_t latency_ns(void)
{
	uint64_t span = soft_cfg.lat_max_ns - soft_cfg.lat_min_ns;
	return soft_cfg.lat_min_ns + (span ? soft_rand() % (span + 1) : 0);
}

/* Queue a completion for `cq`, delivered after the configured latency, never before an
 * earlier completion of the same queue. Caller holds qp->lock. */
static void post_cqe(struct soft_qp *qp, int recv, const struct ibv_wc *wc, int solicited)
{
	uint64_t now = soft_now_ns();
	uint64_t *last = recv ? &qp->last_due_rq : &qp->last_due_sq;
	uint64_t due = now + latency_ns();
	if (due < *last)
		due = *last;
	*last = due;
	struct soft_cq *cq = recv ? qp->rcq : qp->scq;
	/* Always through the heap, so a completion never overtakes an earlier one of its
	 * queue that is due but not yet delivered. */
	struct timer t = {.due = due, .kind = T_CQE, .qp = qp, .cq = cq, .wc = *wc,
			  .solicited = solicited};
	add_timer(&t);
}

static void qp_timer(struct soft_qp *qp, enum tkind kind, uint64_t delay_ns)
{
	struct timer t = {.due = soft_now_ns() + delay_ns, .kind = kind, .qp = qp, .gen = qp->gen};
	add_timer(&t);
}

/* ------------------------------------------------------------------ completions */
static enum ibv_wc_opcode wc_opcode(enum ibv_wr_opcode op)
{
	switch (op) {
	case IBV_WR_RDMA_WRITE:
	case IBV_WR_RDMA_WRITE_WITH_IMM: return IBV_WC_RDMA_WRITE;
	case IBV_WR_SEND:
	case IBV_WR_SEND_WITH_IMM: return IBV_WC_SEND;
	case IBV_WR_RDMA_READ: return IBV_WC_RDMA_READ;
	case IBV_WR_ATOMIC_CMP_AND_SWP: return IBV_WC_COMP_SWAP;
	case IBV_WR_ATOMIC_FETCH_AND_ADD: return IBV_WC_FETCH_ADD;
	default: return IBV_WC_SEND;
	}
}

/* The opcode of an error completion is undefined on real devices; make code that
 * reads it anyway see something no valid completion has. */
#define WC_OPCODE_UNDEFINED ((enum ibv_wc_opcode)0xbad)

static uint32_t vendor_err_of(enum ibv_wc_status s)
{
	switch (s) {
	case IBV_WC_SUCCESS: return 0;
	case IBV_WC_WR_FLUSH_ERR: return 0xf9;
	default: return 0x80 | (uint32_t)s;
	}
}

static int is_read_like(enum ibv_wr_opcode op)
{
	return op == IBV_WR_RDMA_READ || op == IBV_WR_ATOMIC_CMP_AND_SWP ||
	       op == IBV_WR_ATOMIC_FETCH_AND_ADD;
}

/* Hand out completions for finished send WQEs, in order. Caller holds qp->lock. */
static void sq_retire(struct soft_qp *qp)
{
	uint32_t cap = qp->cap.max_send_wr;
	while (qp->sq_head != qp->sq_tx) {
		struct swqe *w = &qp->sq[qp->sq_head % cap];
		if (w->state != WQE_DONE)
			break;
		if (w->signaled || w->status != IBV_WC_SUCCESS) {
			struct ibv_wc wc;
			memset(&wc, 0, sizeof wc);
			wc.wr_id = w->wr_id;
			wc.status = w->status;
			wc.opcode = w->status == IBV_WC_SUCCESS ? wc_opcode(w->opcode)
								 : WC_OPCODE_UNDEFINED;
			wc.vendor_err = w->vendor_err;
			if (w->status == IBV_WC_SUCCESS && w->opcode == IBV_WR_RDMA_READ)
				wc.byte_len = (uint32_t)w->total;
			else if (w->status == IBV_WC_SUCCESS && is_read_like(w->opcode))
				wc.byte_len = 8;
			wc.qp_num = qp->qp.qp_num;
			post_cqe(qp, 0, &wc, 0);
		}
		qp->sq_head++;
	}
	soft_qp_sqd_check_locked(qp);
}

/* In SQD, once every request that had started is finished (none is half sent, none
 * awaits its answer), announce IBV_EVENT_SQ_DRAINED if it was asked for. Caller holds
 * qp->lock. */
void soft_qp_sqd_check_locked(struct soft_qp *qp)
{
	if (qp->state != IBV_QPS_SQD || qp->sqd_notified || qp->sq_head != qp->sq_tx)
		return;
	if (qp->sq_tx != qp->sq_tail && qp->sq[qp->sq_tx % qp->cap.max_send_wr].state == WQE_SENDING)
		return; /* a message is half on the wire: it is finished first */
	qp->sqd_notified = 1;
	if (qp->en_sqd_async_notify)
		soft_async_event(qp->ctx, IBV_EVENT_SQ_DRAINED, (uintptr_t)&qp->qp);
}

static void rq_complete(struct soft_qp *qp, enum ibv_wc_status st, enum ibv_wc_opcode op,
			uint32_t len, int with_imm, uint32_t imm, int solicited)
{
	struct rwqe *r = &qp->rq[qp->rq_head % qp->cap.max_recv_wr];
	struct ibv_wc wc;
	memset(&wc, 0, sizeof wc);
	wc.wr_id = r->wr_id;
	wc.status = st;
	wc.opcode = st == IBV_WC_SUCCESS ? op : WC_OPCODE_UNDEFINED;
	wc.vendor_err = vendor_err_of(st);
	wc.byte_len = len;
	if (with_imm && st == IBV_WC_SUCCESS) {
		wc.imm_data = imm;
		wc.wc_flags = IBV_WC_WITH_IMM;
	}
	wc.qp_num = qp->qp.qp_num;
	wc.src_qp = qp->dest_qpn;
	wc.slid = qp->av.dlid;
	wc.sl = qp->av.sl;
	qp->rq_head++;
	qp->rq_busy = 0;
	post_cqe(qp, 1, &wc, solicited);
}

void soft_qp_flush_locked(struct soft_qp *qp)
{
	uint32_t cap = qp->cap.max_send_wr;
	for (uint32_t i = qp->sq_head; i != qp->sq_tail; i++) {
		struct swqe *w = &qp->sq[i % cap];
		if (w->state != WQE_DONE || w->status == IBV_WC_SUCCESS) {
			if (w->state != WQE_DONE) {
				w->status = IBV_WC_WR_FLUSH_ERR;
				w->vendor_err = vendor_err_of(IBV_WC_WR_FLUSH_ERR);
			}
			w->state = WQE_DONE;
		}
	}
	qp->sq_tx = qp->sq_tail;
	sq_retire(qp);
	while (qp->rq_head != qp->rq_tail)
		rq_complete(qp, IBV_WC_WR_FLUSH_ERR, IBV_WC_RECV, 0, 0, 0, 0);
	qp->rq_busy = 0;
	qp->rd_outstanding = 0;
	qp->waiting = 0;
	if (!on_nic_thread())
		soft_nic_doorbell(qp); /* the NIC closes the QP's connections */
}

/* Move a QP to the error state (from the NIC): the failed WQE (if any) completes with
 * `st`, everything else is flushed, and `event` (if not 0) is raised. */
static void qp_error(struct soft_qp *qp, struct swqe *w, enum ibv_wc_status st,
		     enum ibv_event_type event)
{
	if (qp->state == IBV_QPS_ERR)
		return;
	TRACE("qpn %#x -> ERR: %s%s%s", qp->qp.qp_num, ibv_wc_status_str(st),
	      event ? ", async event " : "", event ? ibv_event_type_str(event) : "");
	if (w) {
		w->status = st;
		w->vendor_err = vendor_err_of(st);
		w->state = WQE_DONE;
	}
	qp->state = IBV_QPS_ERR;
	qp->gen++;
	soft_qp_flush_locked(qp);
	if (event)
		soft_async_event(qp->ctx, event, (uintptr_t)&qp->qp);
}

/* ------------------------------------------------------------------ memory */
/* Look up a local key for the QP's use: exists, same PD, covers [addr, addr+len),
 * has `need` rights. Caller holds the MR read lock. */
static struct soft_mr *local_mr(struct soft_qp *qp, uint32_t lkey, uint64_t addr, uint64_t len,
				int need)
{
	struct soft_mr *mr = soft_mr_find(lkey);
	if (!mr || mr->pd != qp->pd || (mr->access & need) != need)
		return NULL;
	if (addr < mr->addr || addr + len < addr || addr + len > mr->addr + mr->len)
		return NULL;
	return mr;
}

static struct soft_mr *remote_mr(struct soft_qp *qp, uint32_t rkey, uint64_t va, uint64_t len,
				 int need)
{
	struct soft_mr *mr = soft_mr_find(rkey);
	if (!mr || mr->pd != qp->pd || (mr->access & need) != need)
		return NULL;
	if (va < mr->iova || va + len < va || va + len > mr->iova + mr->len)
		return NULL;
	return mr;
}

/* Copy `len` bytes from `src` to `dst` reading the source in ascending address order,
 * one 64-byte source line after another: no piece crosses a line, and an acquire fence
 * (a compiler barrier on x86, whose loads are not reordered with older loads) keeps
 * each line's loads after the previous line's. This is how NICs DMA a READ in practice
 * and what one-sided readers of versioned blocks assume (transport/src/onesided/
 * seqlock.rs: a block's head version read before its payload, its tail after). The
 * kernel's copy for process_vm_readv (rep movsb) promises no order, and glibc's memcpy
 * loads a large copy's last lines first; either made the device hand torn blocks that
 * validate. */
static void ordered_copy(uint8_t *dst, const uint8_t *src, size_t len)
{
	while (len) {
		size_t n = 64 - ((uintptr_t)src & 63);
		if (n > len)
			n = len;
		if (n == 64)
			__builtin_memcpy(dst, src, 64);
		else
			memcpy(dst, src, n);
		__atomic_thread_fence(__ATOMIC_ACQUIRE);
		dst += n;
		src += n;
		len -= n;
	}
}

/* Copy `len` bytes at `addr` of this process into `dst`, in ascending address order
 * (ordered_copy); 0, or EFAULT. process_vm_readv first proves the range readable (a
 * fault becomes an error, never a crash); the ordered copy then overwrites what it
 * read. */
static int copy_out(void *dst, uint64_t addr, size_t len)
{
	if (!len)
		return 0;
	struct iovec l = {dst, len}, r = {(void *)(uintptr_t)addr, len};
	ssize_t n = process_vm_readv(getpid(), &l, 1, &r, 1, 0);
	if (n != (ssize_t)len && !(n < 0 && errno != EFAULT))
		return EFAULT;
	/* Readable (or a sandbox refuses the call itself, seccomp: then trusted as mapped). */
	ordered_copy(dst, (const uint8_t *)(uintptr_t)addr, len);
	return 0;
}

static int copy_in(uint64_t addr, const void *src, size_t len)
{
	if (!len)
		return 0;
	struct iovec l = {(void *)src, len}, r = {(void *)(uintptr_t)addr, len};
	ssize_t n = process_vm_writev(getpid(), &l, 1, &r, 1, 0);
	if (n == (ssize_t)len)
		return 0;
	if (n < 0 && errno != EFAULT) {
		memcpy((void *)(uintptr_t)addr, src, len);
		return 0;
	}
	return EFAULT;
}

/* Build the iovec for bytes [off, off+len) of a scatter list. */
static int sge_iov(const struct ibv_sge *sge, int n, uint64_t off, uint64_t len,
		   struct iovec *iov, int max)
{
	int k = 0;
	for (int i = 0; i < n && len; i++) {
		uint64_t l = sge[i].length;
		if (off >= l) {
			off -= l;
			continue;
		}
		uint64_t take = l - off < len ? l - off : len;
		if (k == max)
			return -1;
		iov[k].iov_base = (void *)(uintptr_t)(sge[i].addr + off);
		iov[k].iov_len = take;
		k++;
		len -= take;
		off = 0;
	}
	return len ? -1 : k;
}

/* ------------------------------------------------------------------ sockets */
static void qp_sock_name(struct sockaddr_un *sa, socklen_t *len, uint32_t qpn)
{
	memset(sa, 0, sizeof *sa);
	sa->sun_family = AF_UNIX;
	int n = snprintf(sa->sun_path + 1, sizeof sa->sun_path - 1, "softrdma.%u.qp.%06x",
			 (unsigned)getuid(), qpn & 0xffffff);
	*len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + 1 + (size_t)n);
}

int soft_qp_listen(uint32_t *qpn_out)
{
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	for (int tries = 0; tries < 4096; tries++) {
		uint32_t qpn = (uint32_t)(soft_rand() % (0xffffff - 0x20)) + 0x20;
		struct sockaddr_un sa;
		socklen_t len;
		qp_sock_name(&sa, &len, qpn);
		if (bind(fd, (struct sockaddr *)&sa, len) == 0) {
			if (listen(fd, 128)) {
				int e = errno;
				close(fd);
				errno = e;
				return -1;
			}
			*qpn_out = qpn;
			return fd;
		}
		if (errno != EADDRINUSE) {
			int e = errno;
			close(fd);
			errno = e;
			return -1;
		}
	}
	close(fd);
	errno = ENOMEM;
	return -1;
}

static void conn_watch(struct conn *c)
{
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (c->want_out ? EPOLLOUT : 0),
				 .data.ptr = &c->fdh};
	epoll_ctl(nic.epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

static struct conn *conn_new(int fd, enum conn_role role, struct soft_qp *qp)
{
	struct conn *c = calloc(1, sizeof *c);
	if (c)
		c->tx_buf = malloc(sizeof(struct wire) + soft_cfg.segment);
	if (!c || !c->tx_buf) {
		if (c)
			free(c);
		close(fd);
		return NULL;
	}
	c->fdh.kind = FDH_CONN;
	c->fdh.obj = c;
	c->fd = fd;
	c->role = role;
	c->qp = qp;
	c->gen = qp->gen;
	list_init(&c->link);
	int sz = 4 << 20;
	setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sz, sizeof sz);
	struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = &c->fdh};
	if (epoll_ctl(nic.epfd, EPOLL_CTL_ADD, fd, &ev)) {
		close(fd);
		free(c->tx_buf);
		free(c);
		return NULL;
	}
	return c;
}

static void requester_lost(struct soft_qp *qp, const char *why);

/* Close a connection. A responder connection hands back a receive it was filling; a
 * requester connection's outstanding work waits for the transport timeout. Caller holds
 * qp->lock. */
static void conn_close(struct conn *c, const char *why)
{
	struct soft_qp *qp = c->qp;
	TRACE2("qpn %#x: %s connection closed: %s", qp->qp.qp_num,
	       c->role == ROLE_REQ ? "requester" : "responder", why);
	epoll_ctl(nic.epfd, EPOLL_CTL_DEL, c->fd, NULL);
	close(c->fd);
	if (c->role == ROLE_RESP) {
		if (c->msg.active && c->msg.rq && !c->msg.discard && c->msg.gen == qp->gen)
			qp->rq_busy = 0; /* the receive stays posted */
		list_del(&c->link);
	} else if (qp->req == c) {
		qp->req = NULL;
	}
	for (struct ritem *r = c->q_head, *n; r; r = n) {
		n = r->next;
		free(r);
	}
	free(c->tx_buf);
	free(c);
}

/* Write what is pending; 1 when the buffer is empty, 0 when the socket is full, -1 on
 * a broken connection. */
static int conn_write_pending(struct conn *c)
{
	while (c->tx_off < c->tx_len) {
		ssize_t n = send(c->fd, c->tx_buf + c->tx_off, c->tx_len - c->tx_off,
				 MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n > 0) {
			c->tx_off += (size_t)n;
			continue;
		}
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			if (!c->want_out) {
				c->want_out = 1;
				conn_watch(c);
			}
			return 0;
		}
		return -1;
	}
	c->tx_len = c->tx_off = 0;
	if (c->want_out) {
		c->want_out = 0;
		conn_watch(c);
	}
	return 1;
}

static struct wire *tx_start(struct conn *c, size_t payload)
{
	c->tx_len = sizeof(struct wire) + payload;
	c->tx_off = 0;
	struct wire *w = (struct wire *)c->tx_buf;
	memset(w, 0, sizeof *w);
	w->len = (uint32_t)payload;
	return w;
}

/* ------------------------------------------------------------------ responder: replies */
static void resp_queue(struct conn *c, const struct wire *h, int is_read, uint64_t va,
		       uint64_t total, uint32_t rkey)
{
	if (h->type == W_ACK && c->q_tail && c->q_tail->hdr.type == W_ACK && !c->q_tail->is_read) {
		c->q_tail->hdr.psn = h->psn; /* cumulative */
		return;
	}
	struct ritem *r = calloc(1, sizeof *r);
	if (!r) {
		soft_warn("out of memory for a response; closing the connection");
		c->dead = 1;
		return;
	}
	r->hdr = *h;
	r->gen = c->qp->gen;
	r->is_read = is_read;
	r->va = va;
	r->total = total;
	r->rkey = rkey;
	if (is_read)
		c->nreads_queued++;
	if (c->q_tail)
		c->q_tail->next = r;
	else
		c->q_head = r;
	c->q_tail = r;
}

static void resp_reply(struct conn *c, int type, uint32_t psn, int code, uint64_t arg1)
{
	struct wire h;
	memset(&h, 0, sizeof h);
	h.type = (uint8_t)type;
	h.op = (uint8_t)code;
	h.psn = psn;
	h.arg1 = arg1;
	resp_queue(c, &h, 0, 0, 0, 0);
}

/* Send queued responses. Caller holds qp->lock. */
static void resp_flush(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	for (;;) {
		int r = conn_write_pending(c);
		if (r < 0) {
			c->dead = 1;
			return;
		}
		if (r == 0)
			return;
		struct ritem *it = c->q_head;
		if (!it)
			return;
		if (it->is_read && (qp->state == IBV_QPS_ERR || qp->state == IBV_QPS_RESET ||
				    it->gen != qp->gen)) {
			/* A responder in error sends no more data. A real requester then
			 * runs into its transport timer; say DROP so that this one does
			 * too, instead of waiting for the rest of the response forever. */
			c->q_head = it->next;
			if (!c->q_head)
				c->q_tail = NULL;
			c->nreads_queued--;
			if (!c->drop_sent) {
				struct wire *w = tx_start(c, 0);
				w->type = W_DROP;
				w->psn = it->hdr.psn;
				c->drop_sent = 1;
				c->dropping = 1;
				TRACE("qpn %#x: READ response psn %#x abandoned: the queue pair is in %s",
				      qp->qp.qp_num, it->hdr.psn, soft_qp_state_str(qp->state));
			}
			free(it);
			continue;
		}
		if (!it->is_read) {
			struct wire *w = tx_start(c, 0);
			*w = it->hdr;
			w->len = 0;
			c->q_head = it->next;
			if (!c->q_head)
				c->q_tail = NULL;
			free(it);
			continue;
		}
		uint64_t left = it->total - it->off;
		size_t len = left < soft_cfg.segment ? (size_t)left : soft_cfg.segment;
		struct wire *w = tx_start(c, len);
		w->type = W_RRESP;
		w->psn = it->hdr.psn;
		w->total = it->total;
		w->offset = it->off;
		w->flags = (uint8_t)((it->off == 0 ? WF_FIRST : 0) |
				     (it->off + len == it->total ? WF_LAST : 0));
		if (len) {
			soft_mr_rdlock();
			struct soft_mr *mr = remote_mr(qp, it->rkey, it->va + it->off, len,
						       IBV_ACCESS_REMOTE_READ);
			int bad = !mr || copy_out(c->tx_buf + sizeof *w,
						  mr->addr + (it->va + it->off - mr->iova), len);
			soft_mr_unlock();
			if (bad) {
				/* The region went away (or was unmapped) while the response was
				 * going out: what a NIC reads from released pages is undefined. */
				memset(c->tx_buf + sizeof *w, 0, len);
				TRACE("qpn %#x: READ response from a region deregistered meanwhile",
				      qp->qp.qp_num);
			}
		}
		it->off += len;
		if (it->off == it->total) {
			c->q_head = it->next;
			if (!c->q_head)
				c->q_tail = NULL;
			c->nreads_queued--;
			free(it);
		}
	}
}

/* ------------------------------------------------------------------ requester */
static uint32_t npkts_of(uint64_t len, enum ibv_mtu mtu)
{
	uint64_t m = mtu_bytes(mtu);
	uint64_t n = len ? (len + m - 1) / m : 1;
	return n > 0xffffff ? 0xffffff : (uint32_t)n;
}

static uint64_t timeout_ns(const struct soft_qp *qp)
{
	/* 4.096 us * 2^timeout; 0 means "wait forever" in the verbs. */
	if (qp->timeout == 0)
		return UINT64_MAX;
	return 4096ull << qp->timeout;
}

static uint64_t rnr_timer_ns(unsigned code)
{
	static const uint32_t us[32] = {655360, 10,    20,    30,    40,     60,     80,	 120,
					160,	240,   320,   480,   640,    960,    1280,   1920,
					2560,	3840,  5120,  7680,  10240,  15360,  20480,  30720,
					40960,	61440, 81920, 122880, 163840, 245760, 327680, 491520};
	return (uint64_t)us[code & 31] * 1000ull;
}

static void schedule_retry(struct soft_qp *qp, const char *why)
{
	if (qp->waiting)
		return;
	uint64_t t = timeout_ns(qp);
	qp->waiting = 1;
	TRACE("qpn %#x: no answer from qpn %#x (%s): retransmitting after %llu us (%d retries "
	      "left)",
	      qp->qp.qp_num, qp->dest_qpn, why,
	      t == UINT64_MAX ? 0ull : (unsigned long long)(t / 1000), qp->retry_left);
	if (t == UINT64_MAX)
		return; /* timeout 0: a real requester waits forever */
	qp_timer(qp, T_RETRY, t);
}

static void requester_lost(struct soft_qp *qp, const char *why)
{
	if (qp->req)
		conn_close(qp->req, why);
	if (qp->sq_head != qp->sq_tail)
		schedule_retry(qp, why);
}

/* One past the last WQE that has started: sq_tx, or sq_tx + 1 while the WQE at sq_tx is
 * half transmitted. A NAK (RNR, remote access, ...) can answer the first segment of a
 * long message while its last ones are still going out; lookups by PSN must see it. */
static uint32_t sq_started_end(const struct soft_qp *qp)
{
	if (qp->sq_tx != qp->sq_tail &&
	    qp->sq[qp->sq_tx % qp->cap.max_send_wr].state == WQE_SENDING)
		return qp->sq_tx + 1;
	return qp->sq_tx;
}

/* Transmission restarts at the WQE with `psn` (or at the oldest unfinished one). */
static void rewind_to(struct soft_qp *qp, int by_psn, uint32_t psn)
{
	uint32_t cap = qp->cap.max_send_wr, i, end = sq_started_end(qp);
	for (i = qp->sq_head; i != end; i++) {
		struct swqe *w = &qp->sq[i % cap];
		if (w->state == WQE_DONE)
			continue;
		if (!by_psn || w->psn == psn)
			break;
	}
	if (i == end)
		return;
	qp->next_psn = qp->sq[i % cap].psn;
	int rd = 0;
	for (uint32_t j = qp->sq_head; j != i; j++) {
		struct swqe *w = &qp->sq[j % cap];
		if (w->state != WQE_DONE && is_read_like(w->opcode))
			rd++;
	}
	for (uint32_t j = i; j != end; j++) {
		struct swqe *w = &qp->sq[j % cap];
		if (w->state == WQE_DONE)
			continue;
		w->state = WQE_POSTED;
		w->sent = w->received = 0;
	}
	qp->rd_outstanding = rd;
	TRACE2("qpn %#x: rewind to psn %#x (%u WQEs resent)", qp->qp.qp_num, qp->next_psn,
	       end - i);
	qp->sq_tx = i;
}

static int ensure_conn(struct soft_qp *qp)
{
	if (qp->req && qp->req->gen == qp->gen)
		return 1;
	if (qp->req)
		conn_close(qp->req, "queue pair changed");
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (fd < 0) {
		schedule_retry(qp, "no socket");
		return 0;
	}
	struct sockaddr_un sa;
	socklen_t len;
	qp_sock_name(&sa, &len, qp->dest_qpn);
	if (connect(fd, (struct sockaddr *)&sa, len)) {
		int e = errno;
		close(fd);
		if (e == EAGAIN) {
			qp->waiting = 1;
			qp_timer(qp, T_KICK, 1000000); /* listener backlog full: try again */
			return 0;
		}
		schedule_retry(qp, "no queue pair with that number is listening");
		return 0;
	}
	struct conn *c = conn_new(fd, ROLE_REQ, qp);
	if (!c) {
		schedule_retry(qp, "out of memory");
		return 0;
	}
	qp->req = c;
	return 1;
}

/* Check the local side of a WQE before its first byte goes out. */
static enum ibv_wc_status validate_local(struct soft_qp *qp, struct swqe *w)
{
	if (w->total > qp->ctx->dev->max_msg_sz)
		return IBV_WC_LOC_LEN_ERR;
	int need = is_read_like(w->opcode) ? IBV_ACCESS_LOCAL_WRITE : 0;
	enum ibv_wc_status st = IBV_WC_SUCCESS;
	soft_mr_rdlock();
	for (int i = 0; i < w->num_sge; i++) {
		const struct ibv_sge *s = &w->sge[i];
		if (!s->length)
			continue;
		if (!local_mr(qp, s->lkey, s->addr, s->length, need)) {
			st = IBV_WC_LOC_PROT_ERR;
			break;
		}
	}
	soft_mr_unlock();
	return st;
}

static void build_hello(struct soft_qp *qp, struct conn *c)
{
	struct wire *w = tx_start(c, sizeof(struct hello));
	w->type = W_HELLO;
	struct hello *h = (struct hello *)(c->tx_buf + sizeof *w);
	memset(h, 0, sizeof *h);
	struct soft_dev *d = qp->ctx->dev;
	h->magic = HELLO_MAGIC;
	h->version = HELLO_VERSION;
	h->src_qpn = qp->qp.qp_num;
	h->dst_qpn = qp->dest_qpn;
	h->src_lid = d->lid;
	h->dlid = qp->av.dlid;
	h->is_global = qp->av.is_global;
	h->link_layer = d->link_layer;
	h->mtu = (uint8_t)qp->path_mtu;
	if (qp->av.is_global && qp->av.grh.sgid_index < d->ngids) {
		memcpy(h->sgid, d->gids[qp->av.grh.sgid_index].raw, 16);
		h->sgid_type = d->gid_types[qp->av.grh.sgid_index];
	} else {
		memcpy(h->sgid, d->gids[0].raw, 16);
		h->sgid_type = d->gid_types[0];
	}
	memcpy(h->dgid, qp->av.grh.dgid.raw, 16);
	h->pid = (uint32_t)getpid();
	h->dev_index = (uint32_t)d->index;
	c->hello_sent = 1;
}

/* Build the next request segment into the connection's buffer. 1 when one was built,
 * 0 when there is nothing (allowed) to send now. Caller holds qp->lock. */
static int build_request(struct soft_qp *qp, struct conn *c)
{
	uint32_t cap = qp->cap.max_send_wr;
	if (qp->sq_tx == qp->sq_tail)
		return 0;
	struct swqe *w = &qp->sq[qp->sq_tx % cap];
	if (w->state == WQE_POSTED) {
		if (qp->state == IBV_QPS_SQD)
			return 0; /* draining: nothing new starts */
		if ((w->flags & IBV_SEND_FENCE) && qp->rd_outstanding)
			return 0;
		if (is_read_like(w->opcode) &&
		    qp->rd_outstanding >= (qp->max_rd_atomic ? qp->max_rd_atomic : 1))
			return 0;
		if (__atomic_load_n(&nic.faults_qp_err, __ATOMIC_RELAXED) >= 0 &&
		    __atomic_fetch_sub(&nic.faults_qp_err, 1, __ATOMIC_RELAXED) == 0) {
			TRACE("fault injection: qpn %#x forced to the error state", qp->qp.qp_num);
			qp_error(qp, NULL, IBV_WC_FATAL_ERR, IBV_EVENT_QP_FATAL);
			return 0;
		}
		if (!w->validated) {
			enum ibv_wc_status st = validate_local(qp, w);
			if (st != IBV_WC_SUCCESS) {
				TRACE("qpn %#x: wr_id %#llx fails locally: %s", qp->qp.qp_num,
				      (unsigned long long)w->wr_id, ibv_wc_status_str(st));
				qp_error(qp, w, st, 0);
				return 0;
			}
			w->validated = 1;
		}
		w->psn = qp->next_psn;
		w->npkts = npkts_of(w->total, qp->path_mtu);
		qp->next_psn = psn_add(qp->next_psn, w->npkts);
		w->state = WQE_SENDING;
		w->sent = 0;
	}
	if (is_read_like(w->opcode)) {
		struct wire *h = tx_start(c, 0);
		h->psn = w->psn;
		h->npkts = w->npkts;
		h->va = w->remote_addr;
		h->rkey = w->rkey;
		h->mtu = (uint8_t)qp->path_mtu;
		if (w->opcode == IBV_WR_RDMA_READ) {
			h->type = W_READ;
			h->total = w->total;
		} else {
			h->type = W_ATOMIC;
			h->op = w->opcode == IBV_WR_ATOMIC_CMP_AND_SWP ? OP_CMP_SWAP : OP_FETCH_ADD;
			h->total = 8;
			h->arg1 = w->compare_add;
			h->arg2 = w->swap;
		}
		w->state = WQE_SENT;
		qp->rd_outstanding++;
		qp->sq_tx++;
		TRACE2("qpn %#x: %s psn %#x va %#llx len %llu", qp->qp.qp_num,
		       soft_opcode_str(w->opcode), w->psn, (unsigned long long)w->remote_addr,
		       (unsigned long long)w->total);
		return 1;
	}
	uint64_t left = w->total - w->sent;
	size_t len = left < soft_cfg.segment ? (size_t)left : soft_cfg.segment;
	struct wire *h = tx_start(c, len);
	h->type = W_REQ;
	switch (w->opcode) {
	case IBV_WR_SEND: h->op = OP_SEND; break;
	case IBV_WR_SEND_WITH_IMM: h->op = OP_SEND_IMM; break;
	case IBV_WR_RDMA_WRITE: h->op = OP_WRITE; break;
	default: h->op = OP_WRITE_IMM; break;
	}
	h->psn = w->psn;
	h->npkts = w->npkts;
	h->total = w->total;
	h->offset = w->sent;
	h->va = w->remote_addr;
	h->rkey = w->rkey;
	h->imm = w->imm;
	h->mtu = (uint8_t)qp->path_mtu;
	h->flags = (uint8_t)((w->sent == 0 ? WF_FIRST : 0) | (w->sent + len == w->total ? WF_LAST : 0) |
			     ((w->flags & IBV_SEND_SOLICITED) ? WF_SOLICITED : 0));
	uint8_t *dst = c->tx_buf + sizeof *h;
	if (len) {
		if (w->flags & IBV_SEND_INLINE) {
			memcpy(dst, w->inline_data + w->sent, len);
		} else {
			struct iovec iov[SOFT_MAX_SGE];
			int k = sge_iov(w->sge, w->num_sge, w->sent, len, iov, SOFT_MAX_SGE);
			int bad = k < 0;
			soft_mr_rdlock();
			for (int i = 0; !bad && i < k; i++) {
				/* the region may have been deregistered since validation */
				int found = 0;
				for (int s = 0; s < w->num_sge && !found; s++)
					found = local_mr(qp, w->sge[s].lkey,
							 (uint64_t)(uintptr_t)iov[i].iov_base,
							 iov[i].iov_len, 0) != NULL;
				bad = !found || copy_out(dst, (uint64_t)(uintptr_t)iov[i].iov_base,
							 iov[i].iov_len);
				dst += iov[i].iov_len;
			}
			soft_mr_unlock();
			if (bad) {
				c->tx_len = c->tx_off = 0;
				qp_error(qp, w, IBV_WC_LOC_PROT_ERR, 0);
				return 0;
			}
		}
	}
	if (w->sent == 0)
		TRACE2("qpn %#x: %s psn %#x len %llu -> qpn %#x", qp->qp.qp_num,
		       soft_opcode_str(w->opcode), w->psn, (unsigned long long)w->total,
		       qp->dest_qpn);
	w->sent += len;
	if (w->sent == w->total) {
		w->state = WQE_SENT;
		qp->sq_tx++;
	}
	return 1;
}

/* Drive a QP: flush an errored one, close connections of a reset one, transmit what
 * an RTS one may. Caller holds qp->lock. */
static void qp_progress(struct soft_qp *qp)
{
	if (qp->destroying)
		return;
	if (qp->state == IBV_QPS_ERR || qp->state == IBV_QPS_RESET) {
		if (qp->req)
			conn_close(qp->req, soft_qp_state_str(qp->state));
		if (qp->state == IBV_QPS_ERR)
			soft_qp_flush_locked(qp);
		struct soft_list *p, *t;
		list_for_each_safe(p, t, &qp->resp_conns)
		{
			struct conn *c = container_of(p, struct conn, link);
			if (qp->state == IBV_QPS_RESET)
				conn_close(c, "queue pair reset");
		}
		return;
	}
	if (qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_SQD)
		return;
	if (qp->req && qp->req->gen != qp->gen)
		conn_close(qp->req, "queue pair changed");
	if (qp->waiting || qp->sq_tx == qp->sq_tail) {
		if (qp->req && qp->req->tx_len) {
			if (conn_write_pending(qp->req) < 0)
				requester_lost(qp, "connection broken");
		}
		return;
	}
	if (!ensure_conn(qp))
		return;
	struct conn *c = qp->req;
	for (;;) {
		int r = conn_write_pending(c);
		if (r < 0) {
			requester_lost(qp, "connection broken");
			return;
		}
		if (r == 0)
			return;
		if (!c->hello_sent) {
			build_hello(qp, c);
			continue;
		}
		if (qp->waiting || (qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_SQD) ||
		    !build_request(qp, c))
			break;
	}
	if (qp->state == IBV_QPS_ERR && qp->req)
		conn_close(qp->req, "queue pair in error");
}

/* Start transmitting on the caller's thread (ibv_post_send) when that needs nothing but
 * writes on an established connection: the QP is RTS, not waiting for a timer, its
 * connection is up and introduced, and nothing is queued on it. Connecting, closing and
 * error handling stay on the NIC thread (only it frees connections, so it never sees an
 * event for a freed one). Returns 1 when every posted request went out (or the rest is
 * flow-controlled by the socket, which the NIC thread watches), 0 when the NIC must be
 * woken. Caller holds qp->lock. */
int soft_nic_kick_locked(struct soft_qp *qp)
{
	struct conn *c = qp->req;
	if (!nic.started || qp->destroying || qp->state != IBV_QPS_RTS || qp->waiting || !c ||
	    c->gen != qp->gen || !c->hello_sent || c->dead || c->tx_len)
		return 0;
	for (;;) {
		if (!build_request(qp, c))
			break;
		int r = conn_write_pending(c);
		if (r < 0)
			return 0; /* broken: the NIC thread finds it and handles it */
		if (r == 0)
			return 1; /* the socket is full; EPOLLOUT is armed for the NIC thread */
	}
	/* An error (validation, fault injection) needs the NIC thread to close the
	 * connection; a READ window or fence that stopped us is resumed by its answers. */
	return qp->state == IBV_QPS_RTS && qp->sq_tx == qp->sq_tail;
}

/* ------------------------------------------------------------------ requester: replies */
static struct swqe *oldest_pending(struct soft_qp *qp)
{
	uint32_t cap = qp->cap.max_send_wr, end = sq_started_end(qp);
	for (uint32_t i = qp->sq_head; i != end; i++) {
		struct swqe *w = &qp->sq[i % cap];
		if (w->state != WQE_DONE)
			return w;
	}
	return NULL;
}

static struct swqe *find_psn(struct soft_qp *qp, uint32_t psn)
{
	uint32_t cap = qp->cap.max_send_wr, end = sq_started_end(qp);
	for (uint32_t i = qp->sq_head; i != end; i++) {
		struct swqe *w = &qp->sq[i % cap];
		if (w->state != WQE_DONE && w->psn == psn)
			return w;
	}
	return NULL;
}

static void progress_made(struct soft_qp *qp)
{
	qp->retry_left = qp->retry_cnt;
	qp->rnr_left = qp->rnr_retry;
}

static void on_ack(struct soft_qp *qp, uint32_t psn)
{
	uint32_t cap = qp->cap.max_send_wr;
	for (uint32_t i = qp->sq_head; i != qp->sq_tx; i++) {
		struct swqe *w = &qp->sq[i % cap];
		if (w->state == WQE_DONE)
			continue;
		if (is_read_like(w->opcode) || w->state != WQE_SENT)
			break; /* responses come in order: nothing past this is acknowledged */
		w->state = WQE_DONE;
		if (w->psn == psn)
			break;
	}
	progress_made(qp);
	sq_retire(qp);
}

static void on_nak(struct soft_qp *qp, const struct wire *h)
{
	struct swqe *w = find_psn(qp, h->psn);
	switch (h->op) {
	case NAK_RNR:
		if (!w)
			return;
		if (qp->rnr_retry != 7 && qp->rnr_left-- <= 0) {
			qp_error(qp, w, IBV_WC_RNR_RETRY_EXC_ERR, 0);
			return;
		}
		TRACE2("qpn %#x: RNR NAK for psn %#x; retrying after %llu us", qp->qp.qp_num,
		       h->psn, (unsigned long long)(rnr_timer_ns((unsigned)h->arg1) / 1000));
		rewind_to(qp, 1, h->psn);
		qp->waiting = 1;
		qp_timer(qp, T_RNR, rnr_timer_ns((unsigned)h->arg1));
		return;
	case NAK_SEQ: {
		struct swqe *e = find_psn(qp, (uint32_t)h->arg1);
		TRACE("qpn %#x: PSN sequence error NAK: qpn %#x expects psn %#x, got %#x",
		      qp->qp.qp_num, qp->dest_qpn, (unsigned)h->arg1, h->psn);
		if (!e) {
			schedule_retry(qp, "PSN sequence error (mismatched PSNs in the handshake?)");
			return;
		}
		if (qp->retry_left-- <= 0) {
			qp_error(qp, e, IBV_WC_RETRY_EXC_ERR, 0);
			return;
		}
		rewind_to(qp, 1, (uint32_t)h->arg1);
		return;
	}
	case NAK_REM_ACCESS: qp_error(qp, w ? w : oldest_pending(qp), IBV_WC_REM_ACCESS_ERR, 0); return;
	case NAK_INV_REQ: qp_error(qp, w ? w : oldest_pending(qp), IBV_WC_REM_INV_REQ_ERR, 0); return;
	default: qp_error(qp, w ? w : oldest_pending(qp), IBV_WC_REM_OP_ERR, 0); return;
	}
}

/* ------------------------------------------------------------------ responder: requests */
enum verdict { V_ACCEPT, V_DROP, V_SILENT, V_DUP };

static int peer_matches(struct soft_qp *qp, const struct hello *p)
{
	struct soft_dev *d = qp->ctx->dev;
	if (p->src_qpn != qp->dest_qpn)
		return 0;
	/* addressed to this port */
	if (p->is_global) {
		uint32_t t = p->sgid_type;
		union ibv_gid g;
		memcpy(g.raw, p->dgid, 16);
		if (soft_gid_lookup(d, &g, d->link_layer == IBV_LINK_LAYER_ETHERNET ? &t : NULL) < 0)
			return 0;
	} else if (d->link_layer != IBV_LINK_LAYER_INFINIBAND || p->dlid != d->lid) {
		return 0;
	}
	/* and this QP's path leads back to the sender */
	if (qp->av.is_global) {
		if (memcmp(qp->av.grh.dgid.raw, p->sgid, 16))
			return 0;
		if (d->link_layer == IBV_LINK_LAYER_ETHERNET &&
		    d->gid_types[qp->av.grh.sgid_index] != p->sgid_type)
			return 0;
	} else if (qp->av.dlid != p->src_lid) {
		return 0;
	}
	return 1;
}

static const char *drop_reason(struct soft_qp *qp, struct conn *c)
{
	if (qp->destroying)
		return "destination queue pair destroyed";
	if (qp->state != IBV_QPS_RTR && qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_SQD)
		return "destination queue pair is not in RTR or RTS";
	if (!c->have_peer)
		return "no HELLO";
	if (!peer_matches(qp, &c->peer))
		return "destination queue pair is connected to another QP or address";
	if (nic.faults_drop == 0)
		return "fault injection (drop_after)";
	return NULL;
}

static void resp_fatal(struct conn *c, uint32_t psn, int nak, enum ibv_event_type ev,
		       enum ibv_wc_status rq_status, const char *why)
{
	struct soft_qp *qp = c->qp;
	TRACE("qpn %#x: request psn %#x from qpn %#x refused: %s", qp->qp.qp_num, psn,
	      qp->dest_qpn, why);
	resp_reply(c, W_NAK, psn, nak, 0);
	if (rq_status != IBV_WC_SUCCESS && qp->rq_head != qp->rq_tail)
		rq_complete(qp, rq_status, IBV_WC_RECV, 0, 0, 0, 0);
	qp_error(qp, NULL, IBV_WC_SUCCESS, ev);
	c->dropping = 1;
	c->drop_sent = 1;
}

/* The memory a message was landing in went away while it arrived (its region was
 * deregistered, or unmapped): the rest is discarded and the responder fails the
 * message as it would have at its first segment, so that the requester gets an error
 * completion rather than no answer at all. Caller holds qp->lock. */
static void resp_memory_gone(struct conn *c, const char *how)
{
	struct rxmsg *m = &c->msg;
	char why[128];
	m->discard = 1;
	if (m->op == OP_WRITE || m->op == OP_WRITE_IMM) {
		snprintf(why, sizeof why, "RDMA WRITE: the target region was %s while it arrived", how);
		resp_fatal(c, m->psn, NAK_REM_ACCESS, IBV_EVENT_QP_ACCESS_ERR, IBV_WC_SUCCESS, why);
	} else {
		snprintf(why, sizeof why, "SEND: the receive buffer was %s while it arrived", how);
		resp_fatal(c, m->psn, NAK_REM_OP, IBV_EVENT_QP_FATAL, IBV_WC_LOC_PROT_ERR, why);
	}
}

/* Decide about the first segment of a message. Caller holds qp->lock. */
static enum verdict judge(struct conn *c, const struct wire *h)
{
	struct soft_qp *qp = c->qp;
	const char *why = drop_reason(qp, c);
	if (why) {
		if (!c->drop_sent) {
			TRACE("qpn %#x: dropping requests from qpn %#x: %s", qp->qp.qp_num,
			      c->have_peer ? c->peer.src_qpn : 0, why);
			resp_reply(c, W_DROP, h->psn, 0, 0);
			c->drop_sent = 1;
		}
		c->dropping = 1;
		return V_SILENT;
	}
	uint32_t d = psn_diff(h->psn, qp->epsn);
	if (d != 0) {
		if (d < (1u << 23)) { /* ahead */
			if (!c->nak_seq_sent && !c->dropping) {
				resp_reply(c, W_NAK, h->psn, NAK_SEQ, qp->epsn);
				c->nak_seq_sent = 1;
			}
			c->dropping = 1;
			return V_SILENT;
		}
		if (c->dropping)
			return V_SILENT;
		return V_DUP; /* behind: a duplicate, answered but not executed again */
	}
	if (h->mtu > qp->path_mtu) {
		resp_fatal(c, h->psn, NAK_INV_REQ, IBV_EVENT_QP_REQ_ERR, IBV_WC_SUCCESS,
			   "packets larger than this queue pair's path MTU");
		return V_SILENT;
	}
	struct soft_dev *dev = qp->ctx->dev;
	if (h->total > dev->max_msg_sz) {
		resp_fatal(c, h->psn, NAK_INV_REQ, IBV_EVENT_QP_REQ_ERR, IBV_WC_SUCCESS,
			   "message longer than the port's max_msg_sz");
		return V_SILENT;
	}
	int needs_rq = h->type == W_REQ && (h->op == OP_SEND || h->op == OP_SEND_IMM ||
					    h->op == OP_WRITE_IMM);
	if (h->type == W_REQ && (h->op == OP_WRITE || h->op == OP_WRITE_IMM)) {
		if (!(qp->access & IBV_ACCESS_REMOTE_WRITE)) {
			resp_fatal(c, h->psn, NAK_REM_ACCESS, IBV_EVENT_QP_ACCESS_ERR, IBV_WC_SUCCESS,
				   "queue pair does not allow remote writes (qp_access_flags)");
			return V_SILENT;
		}
		if (h->total) {
			soft_mr_rdlock();
			struct soft_mr *mr = remote_mr(qp, h->rkey, h->va, h->total,
						       IBV_ACCESS_REMOTE_WRITE);
			soft_mr_unlock();
			if (!mr) {
				resp_fatal(c, h->psn, NAK_REM_ACCESS, IBV_EVENT_QP_ACCESS_ERR,
					   IBV_WC_SUCCESS,
					   "RDMA WRITE: bad rkey, range outside the region, or no "
					   "REMOTE_WRITE");
				return V_SILENT;
			}
		}
	}
	if (h->type == W_READ || h->type == W_ATOMIC) {
		int need = h->type == W_READ ? IBV_ACCESS_REMOTE_READ : IBV_ACCESS_REMOTE_ATOMIC;
		if (!(qp->access & (unsigned)need)) {
			resp_fatal(c, h->psn, NAK_REM_ACCESS, IBV_EVENT_QP_ACCESS_ERR, IBV_WC_SUCCESS,
				   "queue pair does not allow this remote access (qp_access_flags)");
			return V_SILENT;
		}
		if (h->type == W_ATOMIC && (h->va & 7)) {
			resp_fatal(c, h->psn, NAK_INV_REQ, IBV_EVENT_QP_REQ_ERR, IBV_WC_SUCCESS,
				   "atomic on an address that is not 8-byte aligned");
			return V_SILENT;
		}
		if (h->total) {
			soft_mr_rdlock();
			struct soft_mr *mr = remote_mr(qp, h->rkey, h->va, h->total, need);
			soft_mr_unlock();
			if (!mr) {
				resp_fatal(c, h->psn, NAK_REM_ACCESS, IBV_EVENT_QP_ACCESS_ERR,
					   IBV_WC_SUCCESS,
					   h->type == W_READ
						   ? "RDMA READ: bad rkey, range outside the region, "
						     "or no REMOTE_READ"
						   : "atomic: bad rkey, range outside the region, or "
						     "no REMOTE_ATOMIC");
				return V_SILENT;
			}
		}
		if (h->type == W_READ && c->nreads_queued >= (qp->max_dest_rd_atomic ? qp->max_dest_rd_atomic : 1)) {
			resp_fatal(c, h->psn, NAK_INV_REQ, IBV_EVENT_QP_REQ_ERR, IBV_WC_SUCCESS,
				   "more outstanding READs than max_dest_rd_atomic");
			return V_SILENT;
		}
	}
	if (needs_rq) {
		int rnr = qp->rq_head == qp->rq_tail || qp->rq_busy;
		if (!rnr && nic.faults_rnr > 0) {
			nic.faults_rnr--;
			rnr = 1;
			TRACE("fault injection: RNR NAK for qpn %#x", qp->qp.qp_num);
		}
		if (rnr) {
			TRACE2("qpn %#x: no receive posted for psn %#x: RNR NAK", qp->qp.qp_num,
			       h->psn);
			resp_reply(c, W_NAK, h->psn, NAK_RNR, qp->min_rnr_timer);
			c->dropping = 1;
			return V_SILENT;
		}
		if (h->op != OP_WRITE_IMM) {
			struct rwqe *r = &qp->rq[qp->rq_head % qp->cap.max_recv_wr];
			if (h->total > r->total) {
				resp_fatal(c, h->psn, NAK_INV_REQ, IBV_EVENT_QP_REQ_ERR,
					   IBV_WC_LOC_LEN_ERR,
					   "SEND longer than the posted receive buffer");
				return V_SILENT;
			}
			int ok = 1;
			soft_mr_rdlock();
			for (int i = 0; i < r->num_sge && ok; i++)
				if (r->sge[i].length)
					ok = local_mr(qp, r->sge[i].lkey, r->sge[i].addr,
						      r->sge[i].length, IBV_ACCESS_LOCAL_WRITE) != NULL;
			soft_mr_unlock();
			if (!ok) {
				resp_fatal(c, h->psn, NAK_REM_OP, IBV_EVENT_QP_FATAL,
					   IBV_WC_LOC_PROT_ERR,
					   "receive buffer with a bad lkey or without LOCAL_WRITE");
				return V_SILENT;
			}
		}
	}
	c->dropping = 0;
	c->drop_sent = 0;
	c->nak_seq_sent = 0;
	if (nic.faults_drop > 0)
		nic.faults_drop--;
	if (qp->state == IBV_QPS_RTR && !qp->comm_est) {
		qp->comm_est = 1;
		soft_async_event(qp->ctx, IBV_EVENT_COMM_EST, (uintptr_t)&qp->qp);
	}
	return V_ACCEPT;
}

static void finish_message(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	struct rxmsg *m = &c->msg;
	m->active = 0;
	if (m->discard)
		return;
	if (m->gen != qp->gen ||
	    (qp->state != IBV_QPS_RTR && qp->state != IBV_QPS_RTS && qp->state != IBV_QPS_SQD)) {
		/* The QP went to ERR or RESET while the message was arriving: its receive
		 * was flushed, and a responder in that state executes and acknowledges
		 * nothing. The requester learns it by its transport timer. */
		TRACE("qpn %#x: message psn %#x from qpn %#x dropped: the queue pair left RTR/RTS "
		      "while it arrived",
		      qp->qp.qp_num, m->psn, qp->dest_qpn);
		if (!c->drop_sent) {
			resp_reply(c, W_DROP, m->psn, 0, 0);
			c->drop_sent = 1;
		}
		c->dropping = 1;
		return;
	}
	qp->epsn = psn_add(qp->epsn, m->npkts);
	if (m->rq) {
		int imm = m->op == OP_SEND_IMM || m->op == OP_WRITE_IMM;
		rq_complete(qp, IBV_WC_SUCCESS,
			    m->op == OP_WRITE_IMM ? IBV_WC_RECV_RDMA_WITH_IMM : IBV_WC_RECV,
			    (uint32_t)m->total, imm, m->imm, !!(m->flags & WF_SOLICITED));
	}
	resp_reply(c, W_ACK, m->psn, 0, 0);
}

static void atomic_execute(struct conn *c, const struct wire *h)
{
	struct soft_qp *qp = c->qp;
	uint64_t orig = 0;
	soft_mr_rdlock();
	struct soft_mr *mr = remote_mr(qp, h->rkey, h->va, 8, IBV_ACCESS_REMOTE_ATOMIC);
	if (mr) {
		uint64_t *p = (uint64_t *)(uintptr_t)(mr->addr + (h->va - mr->iova));
		if (h->op == OP_CMP_SWAP) {
			orig = h->arg1;
			if (!__atomic_compare_exchange_n(p, &orig, h->arg2, 0, __ATOMIC_SEQ_CST,
							 __ATOMIC_SEQ_CST)) {
				/* orig holds the current value */
			}
		} else {
			orig = __atomic_fetch_add(p, h->arg1, __ATOMIC_SEQ_CST);
		}
	}
	soft_mr_unlock();
	struct wire r;
	memset(&r, 0, sizeof r);
	r.type = W_ARESP;
	r.psn = h->psn;
	r.arg1 = orig;
	resp_queue(c, &r, 0, 0, 0, 0);
}

/* A request header arrived on a responder connection. Returns 0, or -1 to close. */
static int resp_header(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	struct wire *h = &c->hdr;
	switch (h->type) {
	case W_HELLO:
		if (h->len != sizeof(struct hello))
			return -1;
		return 0; /* the body is the hello */
	case W_REQ: {
		if (h->len > soft_cfg.segment || h->offset + h->len > h->total)
			return -1;
		if (h->offset == 0) {
			if (c->msg.active && !c->msg.discard)
				return -1; /* a new message before the last one ended */
			enum verdict v = judge(c, h);
			memset(&c->msg, 0, sizeof c->msg);
			c->msg.active = 1;
			c->msg.op = h->op;
			c->msg.psn = h->psn;
			c->msg.npkts = h->npkts;
			c->msg.total = h->total;
			c->msg.imm = h->imm;
			c->msg.flags = h->flags;
			c->msg.va = h->va;
			c->msg.rkey = h->rkey;
			c->msg.gen = qp->gen;
			if (v == V_ACCEPT) {
				c->msg.rq = h->op != OP_WRITE;
				if (c->msg.rq)
					qp->rq_busy = 1;
			} else {
				c->msg.discard = 1;
				if (v == V_DUP)
					resp_reply(c, W_ACK, h->psn, 0, 0);
			}
		} else if (!c->msg.active || c->msg.psn != h->psn) {
			if (!c->dropping)
				return -1; /* a continuation of nothing */
			memset(&c->msg, 0, sizeof c->msg);
			c->msg.active = 1;
			c->msg.discard = 1;
			c->msg.psn = h->psn;
			c->msg.total = h->total;
		}
		c->body_off = h->offset;
		if (h->len == 0 && (h->flags & WF_LAST))
			finish_message(c);
		return 0;
	}
	case W_READ: {
		enum verdict v = judge(c, h);
		if (v == V_ACCEPT || v == V_DUP) {
			struct wire r;
			memset(&r, 0, sizeof r);
			r.type = W_RRESP;
			r.psn = h->psn;
			resp_queue(c, &r, 1, h->va, h->total, h->rkey);
			if (v == V_ACCEPT)
				qp->epsn = psn_add(qp->epsn, h->npkts);
		}
		return 0;
	}
	case W_ATOMIC: {
		enum verdict v = judge(c, h);
		if (v == V_ACCEPT) {
			atomic_execute(c, h);
			qp->epsn = psn_add(qp->epsn, 1);
		} else if (v == V_DUP) {
			TRACE("qpn %#x: duplicate atomic psn %#x answered with 0", qp->qp.qp_num,
			      h->psn);
			struct wire r;
			memset(&r, 0, sizeof r);
			r.type = W_ARESP;
			r.psn = h->psn;
			resp_queue(c, &r, 0, 0, 0, 0);
		}
		return 0;
	}
	default: return -1;
	}
}

/* Where the next body bytes of a responder connection go: iovecs into registered
 * memory, or none (discard). Caller holds qp->lock and the MR read lock. */
static int resp_body_iov(struct conn *c, struct iovec *iov, int max, uint64_t len)
{
	struct soft_qp *qp = c->qp;
	struct rxmsg *m = &c->msg;
	if (m->discard || m->gen != qp->gen || qp->state == IBV_QPS_ERR ||
	    qp->state == IBV_QPS_RESET)
		return 0;
	if (m->op == OP_WRITE || m->op == OP_WRITE_IMM) {
		struct soft_mr *mr = remote_mr(qp, m->rkey, m->va + c->body_off, len,
					       IBV_ACCESS_REMOTE_WRITE);
		if (!mr)
			return -1;
		iov[0].iov_base = (void *)(uintptr_t)(mr->addr + (m->va + c->body_off - mr->iova));
		iov[0].iov_len = len;
		return 1;
	}
	struct rwqe *r = &qp->rq[qp->rq_head % qp->cap.max_recv_wr];
	int k = sge_iov(r->sge, r->num_sge, c->body_off, len, iov, max);
	if (k < 0)
		return -1;
	for (int i = 0; i < k; i++) {
		int found = 0;
		for (int s = 0; s < r->num_sge && !found; s++)
			found = local_mr(qp, r->sge[s].lkey, (uint64_t)(uintptr_t)iov[i].iov_base,
					 iov[i].iov_len, IBV_ACCESS_LOCAL_WRITE) != NULL;
		if (!found)
			return -1;
	}
	return k;
}

/* Where READ response bytes land on the requester. */
static int req_body_iov(struct conn *c, struct swqe *w, struct iovec *iov, int max, uint64_t len)
{
	struct soft_qp *qp = c->qp;
	int k = sge_iov(w->sge, w->num_sge, c->body_off, len, iov, max);
	if (k < 0)
		return -1;
	for (int i = 0; i < k; i++) {
		int found = 0;
		for (int s = 0; s < w->num_sge && !found; s++)
			found = local_mr(qp, w->sge[s].lkey, (uint64_t)(uintptr_t)iov[i].iov_base,
					 iov[i].iov_len, IBV_ACCESS_LOCAL_WRITE) != NULL;
		if (!found)
			return -1;
	}
	return k;
}

/* A response header arrived on a requester connection. Returns 0, or -1 to close. */
static int req_header(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	struct wire *h = &c->hdr;
	if (c->gen != qp->gen)
		return 0; /* stale: its bytes are read and ignored */
	switch (h->type) {
	case W_ACK: on_ack(qp, h->psn); return 0;
	case W_NAK: on_nak(qp, h); return 0;
	case W_DROP: schedule_retry(qp, "the destination dropped the request"); return 0;
	case W_RRESP: {
		struct swqe *w = oldest_pending(qp);
		if (!w || w->opcode != IBV_WR_RDMA_READ || w->psn != h->psn || w->state != WQE_SENT ||
		    h->offset != w->received || h->offset + h->len > w->total)
			return -1;
		c->body_off = h->offset;
		return 0;
	}
	case W_ARESP: {
		struct swqe *w = oldest_pending(qp);
		if (!w || !is_read_like(w->opcode) || w->opcode == IBV_WR_RDMA_READ ||
		    w->psn != h->psn || w->state != WQE_SENT)
			return -1;
		soft_mr_rdlock();
		int ok = local_mr(qp, w->sge[0].lkey, w->sge[0].addr, 8, IBV_ACCESS_LOCAL_WRITE) &&
			 !copy_in(w->sge[0].addr, &h->arg1, 8);
		soft_mr_unlock();
		if (!ok) {
			qp_error(qp, w, IBV_WC_LOC_PROT_ERR, 0);
			return 0;
		}
		w->state = WQE_DONE;
		qp->rd_outstanding--;
		progress_made(qp);
		sq_retire(qp);
		return 0;
	}
	default: return -1;
	}
}

static void read_landed(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	struct swqe *w = oldest_pending(qp);
	if (!w)
		return;
	w->received = c->body_off;
	if (w->received == w->total && (c->hdr.flags & WF_LAST)) {
		w->state = WQE_DONE;
		qp->rd_outstanding--;
		progress_made(qp);
		sq_retire(qp);
	}
}

/* ------------------------------------------------------------------ receive loop */
/* Read from a connection until it would block (or a budget is spent). Caller holds
 * qp->lock. Returns -1 when the connection must close. */
static int conn_read(struct conn *c)
{
	struct soft_qp *qp = c->qp;
	size_t budget = 4u << 20;
	while (budget) {
		if (!c->in_body) {
			ssize_t n = recv(c->fd, c->rx_hdr + c->rx_got, sizeof c->rx_hdr - c->rx_got,
					 MSG_DONTWAIT);
			if (n == 0)
				return -1;
			if (n < 0)
				return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
			c->rx_got += (size_t)n;
			if (c->rx_got < sizeof c->rx_hdr)
				continue;
			c->rx_got = 0;
			memcpy(&c->hdr, c->rx_hdr, sizeof c->hdr);
			int r = c->role == ROLE_RESP ? resp_header(c) : req_header(c);
			if (r < 0) {
				TRACE("qpn %#x: malformed segment (type %u) from the peer; closing",
				      qp->qp.qp_num, c->hdr.type);
				return -1;
			}
			c->body_left = c->hdr.len;
			c->in_body = c->body_left > 0;
			if (!c->in_body && c->role == ROLE_REQ && c->hdr.type == W_RRESP &&
			    c->gen == qp->gen)
				read_landed(c);
			if (c->role == ROLE_RESP)
				resp_flush(c);
			continue;
		}
		/* body */
		struct iovec iov[SOFT_MAX_SGE + 1];
		int k = 0;
		uint64_t want = c->body_left < budget ? c->body_left : budget;
		struct hello *hello_dst = NULL;
		soft_mr_rdlock();
		if (c->role == ROLE_RESP && c->hdr.type == W_HELLO) {
			hello_dst = &c->peer;
			iov[0].iov_base = (uint8_t *)&c->peer + (sizeof c->peer - c->body_left);
			iov[0].iov_len = (size_t)c->body_left;
			k = 1;
		} else if (c->role == ROLE_RESP) {
			k = resp_body_iov(c, iov, SOFT_MAX_SGE, want);
			if (k < 0) {
				soft_mr_unlock();
				resp_memory_gone(c, "deregistered");
				soft_mr_rdlock();
				k = 0;
			}
		} else if (c->gen == qp->gen && c->hdr.type == W_RRESP) {
			struct swqe *w = oldest_pending(qp);
			k = w ? req_body_iov(c, w, iov, SOFT_MAX_SGE, want) : -1;
			if (k < 0) {
				soft_mr_unlock();
				if (w)
					qp_error(qp, w, IBV_WC_LOC_PROT_ERR, 0);
				soft_mr_rdlock();
				k = 0;
			}
		}
		if (k == 0) {
			iov[0].iov_base = nic.scratch;
			iov[0].iov_len = want < SCRATCH ? (size_t)want : SCRATCH;
			k = 1;
		}
		struct msghdr mh = {.msg_iov = iov, .msg_iovlen = (size_t)k};
		ssize_t n = recvmsg(c->fd, &mh, MSG_DONTWAIT);
		int e = errno;
		soft_mr_unlock();
		if (n == 0)
			return -1;
		if (n < 0) {
			if (e == EAGAIN || e == EINTR)
				return 0;
			if (e == EFAULT) {
				/* Registered memory that is not mapped any more (munmap without
				 * ibv_dereg_mr): an error completion, as for a bad key. The bytes
				 * stay in the socket and go to scratch from now on. */
				TRACE("qpn %#x: registered memory is not mapped any more; the data "
				      "is dropped",
				      qp->qp.qp_num);
				if (c->role == ROLE_RESP) {
					if (!c->msg.discard)
						resp_memory_gone(c, "unmapped");
				} else if (c->gen == qp->gen && c->hdr.type == W_RRESP) {
					qp_error(qp, oldest_pending(qp), IBV_WC_LOC_PROT_ERR, 0);
				}
				continue;
			}
			return -1;
		}
		c->body_left -= (uint64_t)n;
		c->body_off += (uint64_t)n;
		budget = budget > (size_t)n ? budget - (size_t)n : 0;
		if (c->body_left)
			continue;
		c->in_body = 0;
		if (hello_dst) {
			if (c->peer.magic != HELLO_MAGIC || c->peer.version != HELLO_VERSION)
				return -1;
			c->have_peer = 1;
			TRACE2("qpn %#x: connection from qpn %#x (pid %u)", qp->qp.qp_num,
			       c->peer.src_qpn, c->peer.pid);
			continue;
		}
		if (c->role == ROLE_RESP) {
			if (c->msg.active && (c->hdr.flags & WF_LAST) &&
			    c->body_off == c->msg.total)
				finish_message(c);
			resp_flush(c);
		} else if (c->gen == qp->gen && c->hdr.type == W_RRESP) {
			read_landed(c);
		}
	}
	return 0;
}

/* ------------------------------------------------------------------ the loop */
static void handle_conn(struct conn *c, uint32_t events)
{
	struct soft_qp *qp = c->qp;
	pthread_mutex_lock(&qp->lock);
	int close_it = 0;
	if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
		close_it = conn_read(c) < 0;
	if (!close_it && (events & EPOLLOUT)) {
		if (c->role == ROLE_RESP)
			resp_flush(c);
		else if (conn_write_pending(c) < 0)
			close_it = 1;
	}
	if (c->dead)
		close_it = 1;
	enum conn_role role = c->role;
	if (close_it) {
		if (role == ROLE_REQ) {
			if (c->gen == qp->gen && qp->req == c)
				requester_lost(qp, "the destination closed the connection");
			else
				conn_close(c, "stale");
		} else {
			conn_close(c, "peer closed the connection");
		}
	} else if (role == ROLE_REQ) {
		qp_progress(qp); /* acknowledgements may have made room */
	}
	if (role == ROLE_RESP && (qp->state == IBV_QPS_ERR || qp->state == IBV_QPS_RESET))
		qp_progress(qp); /* a refused request put the QP in error: close its requester */
	pthread_mutex_unlock(&qp->lock);
}

static void handle_listen(struct soft_qp *qp)
{
	for (;;) {
		int fd = accept4(qp->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
		if (fd < 0)
			return;
		struct ucred cr;
		socklen_t cl = sizeof cr;
		if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &cl) || cr.uid != getuid()) {
			TRACE("qpn %#x: connection from another user refused", qp->qp.qp_num);
			close(fd);
			continue;
		}
		pthread_mutex_lock(&qp->lock);
		if (qp->destroying) {
			pthread_mutex_unlock(&qp->lock);
			close(fd);
			continue;
		}
		struct conn *c = conn_new(fd, ROLE_RESP, qp);
		if (c)
			list_add_tail(&qp->resp_conns, &c->link);
		pthread_mutex_unlock(&qp->lock);
	}
}

static void qp_remove_now(struct soft_qp *qp)
{
	pthread_mutex_lock(&qp->lock);
	if (qp->req)
		conn_close(qp->req, "queue pair destroyed");
	while (!list_empty(&qp->resp_conns))
		conn_close(container_of(qp->resp_conns.next, struct conn, link),
			   "queue pair destroyed");
	if (qp->listen_fd >= 0) {
		epoll_ctl(nic.epfd, EPOLL_CTL_DEL, qp->listen_fd, NULL);
		close(qp->listen_fd);
		qp->listen_fd = -1;
	}
	pthread_mutex_unlock(&qp->lock);
	pthread_mutex_lock(&nic.lock);
	heap_purge_qp(qp);
	if (qp->on_nic_list) {
		list_del(&qp->nic_link);
		qp->on_nic_list = 0;
	}
	if (qp->nic_known) {
		list_del(&qp->all_link);
		qp->nic_known = 0;
	}
	pthread_mutex_unlock(&nic.lock);
}

static void run_timer(struct timer *t)
{
	if (t->kind == T_CQE) {
		soft_cq_push(t->cq, &t->wc, t->solicited);
		return;
	}
	struct soft_qp *qp = t->qp;
	pthread_mutex_lock(&qp->lock);
	if (t->gen == qp->gen && qp->waiting) {
		qp->waiting = 0;
		if (t->kind == T_RETRY) {
			if (qp->retry_left-- <= 0) {
				struct swqe *w = oldest_pending(qp);
				if (!w && qp->sq_tx != qp->sq_tail)
					w = &qp->sq[qp->sq_tx % qp->cap.max_send_wr];
				qp_error(qp, w, IBV_WC_RETRY_EXC_ERR, 0);
			} else {
				if (qp->req)
					conn_close(qp->req, "retransmission");
				rewind_to(qp, 0, 0);
			}
		}
		qp_progress(qp);
	}
	pthread_mutex_unlock(&qp->lock);
}

static void run_cmds(void)
{
	for (;;) {
		pthread_mutex_lock(&nic.lock);
		struct cmd *c = nic.cmds;
		if (c)
			nic.cmds = c->next;
		pthread_mutex_unlock(&nic.lock);
		if (!c)
			return;
		if (c->kind == C_REMOVE) {
			qp_remove_now(c->qp);
			pthread_mutex_lock(&nic.lock);
			c->done = 1;
			pthread_cond_broadcast(&nic.cond);
			pthread_mutex_unlock(&nic.lock);
		} else {
			struct soft_cq *cq = c->cq;
			struct soft_list *p;
			pthread_mutex_lock(&nic.lock);
			int n = 0;
			struct soft_qp *hit[256];
			list_for_each(p, &nic.all)
			{
				struct soft_qp *qp = container_of(p, struct soft_qp, all_link);
				if ((qp->scq == cq || qp->rcq == cq) && n < 256)
					hit[n++] = qp;
			}
			pthread_mutex_unlock(&nic.lock);
			for (int i = 0; i < n; i++) {
				pthread_mutex_lock(&hit[i]->lock);
				qp_error(hit[i], NULL, IBV_WC_SUCCESS, IBV_EVENT_QP_FATAL);
				qp_progress(hit[i]);
				pthread_mutex_unlock(&hit[i]->lock);
			}
			free(c);
		}
	}
}

static void run_work(void)
{
	for (;;) {
		pthread_mutex_lock(&nic.lock);
		if (list_empty(&nic.work)) {
			pthread_mutex_unlock(&nic.lock);
			return;
		}
		struct soft_qp *qp = container_of(nic.work.next, struct soft_qp, nic_link);
		list_del(&qp->nic_link);
		qp->on_nic_list = 0;
		pthread_mutex_unlock(&nic.lock);
		pthread_mutex_lock(&qp->lock);
		qp_progress(qp);
		pthread_mutex_unlock(&qp->lock);
	}
}

static void arm_timer(void)
{
	pthread_mutex_lock(&nic.lock);
	uint64_t due = nic.nheap ? nic.heap[0].due : UINT64_MAX;
	pthread_mutex_unlock(&nic.lock);
	if (due == nic.armed)
		return;
	nic.armed = due;
	struct itimerspec its;
	memset(&its, 0, sizeof its);
	if (due != UINT64_MAX) {
		if (due == 0)
			due = 1;
		its.it_value.tv_sec = (time_t)(due / 1000000000ull);
		its.it_value.tv_nsec = (long)(due % 1000000000ull);
	}
	timerfd_settime(nic.tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void *nic_main(void *arg)
{
	(void)arg;
	prctl(PR_SET_NAME, "softrdma-nic", 0, 0, 0);
	prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0);
	struct epoll_event evs[64];
	for (;;) {
		arm_timer();
		int n = epoll_wait(nic.epfd, evs, 64, -1);
		if (n < 0 && errno != EINTR) {
			soft_warn("epoll_wait failed: %s; the NIC stops", strerror(errno));
			return NULL;
		}
		for (int i = 0; i < n; i++) {
			struct soft_fdh *h = evs[i].data.ptr;
			switch (h->kind) {
			case FDH_EVENT: {
				uint64_t v;
				ssize_t r = read(nic.evfd, &v, sizeof v);
				(void)r;
				break;
			}
			case FDH_TIMER: {
				uint64_t v;
				ssize_t r = read(nic.tfd, &v, sizeof v);
				(void)r;
				nic.armed = UINT64_MAX;
				break;
			}
			case FDH_LISTEN: handle_listen(h->obj); break;
			case FDH_CONN: handle_conn(h->obj, evs[i].events); break;
			}
		}
		run_cmds();
		run_work();
		for (;;) {
			struct timer t;
			pthread_mutex_lock(&nic.lock);
			if (!nic.nheap || nic.heap[0].due > soft_now_ns()) {
				pthread_mutex_unlock(&nic.lock);
				break;
			}
			heap_pop(&t);
			pthread_mutex_unlock(&nic.lock);
			run_timer(&t);
		}
	}
	return NULL;
}

/* ------------------------------------------------------------------ entry points */
int soft_nic_start(void)
{
	pthread_mutex_lock(&start_lock);
	if (nic.started) {
		pthread_mutex_unlock(&start_lock);
		return 0;
	}
	nic.epfd = epoll_create1(EPOLL_CLOEXEC);
	nic.evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	nic.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
	nic.scratch = malloc(SCRATCH);
	if (nic.epfd < 0 || nic.evfd < 0 || nic.tfd < 0 || !nic.scratch) {
		int e = errno ? errno : ENOMEM;
		pthread_mutex_unlock(&start_lock);
		errno = e;
		return -1;
	}
	list_init(&nic.work);
	list_init(&nic.all);
	nic.armed = UINT64_MAX;
	nic.faults_rnr = soft_cfg.fault_rnr;
	nic.faults_qp_err = soft_cfg.fault_qp_error_after;
	nic.faults_drop = soft_cfg.fault_drop_after;
	nic.evh.kind = FDH_EVENT;
	nic.th.kind = FDH_TIMER;
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &nic.evh};
	epoll_ctl(nic.epfd, EPOLL_CTL_ADD, nic.evfd, &ev);
	ev.data.ptr = &nic.th;
	epoll_ctl(nic.epfd, EPOLL_CTL_ADD, nic.tfd, &ev);
	pthread_attr_t at;
	pthread_attr_init(&at);
	pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
	int rc = pthread_create(&nic.thread, &at, nic_main, NULL);
	pthread_attr_destroy(&at);
	if (rc) {
		pthread_mutex_unlock(&start_lock);
		errno = rc;
		return -1;
	}
	nic.started = 1;
	pthread_mutex_unlock(&start_lock);
	TRACE("NIC thread started");
	return 0;
}

void soft_nic_doorbell(struct soft_qp *qp)
{
	if (!nic.started)
		return;
	pthread_mutex_lock(&nic.lock);
	int add = !qp->on_nic_list && qp->nic_known;
	if (add) {
		list_add_tail(&nic.work, &qp->nic_link);
		qp->on_nic_list = 1;
	}
	pthread_mutex_unlock(&nic.lock);
	if (add && !on_nic_thread())
		wake();
}

void soft_nic_qp_changed(struct soft_qp *qp) { soft_nic_doorbell(qp); }

void soft_nic_qp_add(struct soft_qp *qp)
{
	qp->lfdh.kind = FDH_LISTEN;
	qp->lfdh.obj = qp;
	pthread_mutex_lock(&nic.lock);
	list_add_tail(&nic.all, &qp->all_link);
	qp->nic_known = 1;
	pthread_mutex_unlock(&nic.lock);
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &qp->lfdh};
	if (epoll_ctl(nic.epfd, EPOLL_CTL_ADD, qp->listen_fd, &ev))
		soft_warn("qpn %#x: cannot watch its socket: %s", qp->qp.qp_num, strerror(errno));
}

void soft_nic_qp_remove(struct soft_qp *qp)
{
	if (!nic.started || on_nic_thread()) {
		qp_remove_now(qp);
		return;
	}
	struct cmd c = {.kind = C_REMOVE, .qp = qp};
	pthread_mutex_lock(&nic.lock);
	c.next = nic.cmds;
	nic.cmds = &c;
	pthread_mutex_unlock(&nic.lock);
	wake();
	pthread_mutex_lock(&nic.lock);
	while (!c.done)
		pthread_cond_wait(&nic.cond, &nic.lock);
	pthread_mutex_unlock(&nic.lock);
}

void soft_nic_cq_overrun(struct soft_cq *cq)
{
	struct cmd *c = calloc(1, sizeof *c);
	if (!c)
		return;
	c->kind = C_OVERRUN;
	c->cq = cq;
	pthread_mutex_lock(&nic.lock);
	c->next = nic.cmds;
	nic.cmds = c;
	pthread_mutex_unlock(&nic.lock);
	/* Also from the NIC thread itself (a completion timer overran the CQ): it runs
	 * commands only after epoll_wait returns, and nothing else may wake it. */
	wake();
}

void soft_nic_after_fork(void)
{
	/* In the child: drop the parent's NIC without touching its sockets' peers (closing
	 * our copies does not close the parent's). */
	if (!nic.started)
		return;
	struct soft_list *p;
	list_for_each(p, &nic.all)
	{
		struct soft_qp *qp = container_of(p, struct soft_qp, all_link);
		if (qp->listen_fd >= 0)
			close(qp->listen_fd);
		if (qp->req)
			close(qp->req->fd);
		struct soft_list *q;
		list_for_each(q, &qp->resp_conns) close(container_of(q, struct conn, link)->fd);
	}
	close(nic.epfd);
	close(nic.evfd);
	close(nic.tfd);
	nic.started = 0;
	nic.cmds = NULL;
	nic.nheap = 0;
	list_init(&nic.work);
	list_init(&nic.all);
	pthread_mutex_init(&nic.lock, NULL);
	pthread_cond_init(&nic.cond, NULL);
	pthread_mutex_init(&start_lock, NULL);
}
