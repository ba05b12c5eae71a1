/* softrdma: a software RDMA device behind the public libibverbs ABI.
 *
 * Internal header shared by the library's translation units. The public structs come
 * from rdma-core's own <infiniband/verbs.h>, so every layout an application sees is the
 * real library's. See ../README.md for what is emulated and how.
 */
#ifndef SOFTRDMA_SOFT_H
#define SOFTRDMA_SOFT_H

#define _GNU_SOURCE
#include <infiniband/verbs.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

#define SOFT_VERSION "softrdma 1.0"

/* ------------------------------------------------------------------ limits */
#define SOFT_MAX_DEVICES 8
#define SOFT_GID_TBL_LEN 16
#define SOFT_MAX_QP 4096
#define SOFT_MAX_QP_WR 16384
#define SOFT_MAX_SGE 16
#define SOFT_MAX_CQ 4096
#define SOFT_MAX_CQE 65535
#define SOFT_MAX_MR 65536
#define SOFT_MAX_PD 4096
#define SOFT_MAX_RD_ATOM 16
#define SOFT_MAX_INLINE 256
#define SOFT_MAX_MR_SIZE (1ULL << 40)
#define SOFT_NUM_COMP_VECTORS 4
#define SOFT_VENDOR_ID 0x1d0f /* arbitrary; not a real vendor's device */
#define SOFT_VENDOR_PART 0x50f7

/* ------------------------------------------------------------------ config */
struct soft_config {
	int trace;                 /* 0 off, 1 verbs, 2 verbs + NIC events */
	int trace_fd;              /* where trace lines go (stderr by default) */
	uint64_t lat_min_ns;       /* completion latency, uniformly drawn */
	uint64_t lat_max_ns;
	uint64_t seed;
	size_t segment;            /* bytes of payload per wire segment */
	/* fault injection (SOFTRDMA_FAULTS) */
	long fault_rnr;            /* answer the first N SEND/WRITE_IMM with RNR NAK */
	long fault_qp_error_after; /* force a QP to ERR after N send WQEs (-1 off) */
	long fault_drop_after;     /* drop every request after the first N (-1 off) */
};
extern struct soft_config soft_cfg;

/* ------------------------------------------------------------------ tracing */
void soft_trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
#define TRACE(...)                                                                        \
	do {                                                                              \
		if (soft_cfg.trace >= 1)                                                  \
			soft_trace(__VA_ARGS__);                                          \
	} while (0)
#define TRACE2(...)                                                                       \
	do {                                                                              \
		if (soft_cfg.trace >= 2)                                                  \
			soft_trace(__VA_ARGS__);                                          \
	} while (0)
/* A message that always goes to stderr (the real library's warnings do too). */
void soft_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

uint64_t soft_now_ns(void);
uint64_t soft_rand(void);
void soft_rand_lock(void);
void soft_rand_unlock(void);
void soft_rand_after_fork(void);
void soft_init(void);

/* ------------------------------------------------------------------ lists */
struct soft_list {
	struct soft_list *prev, *next;
};
static inline void list_init(struct soft_list *l) { l->prev = l->next = l; }
static inline int list_empty(const struct soft_list *l) { return l->next == l; }
static inline void list_add_tail(struct soft_list *l, struct soft_list *n)
{
	n->prev = l->prev;
	n->next = l;
	l->prev->next = n;
	l->prev = n;
}
static inline void list_del(struct soft_list *n)
{
	n->prev->next = n->next;
	n->next->prev = n->prev;
	n->prev = n->next = n;
}
#define container_of(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))
#define list_for_each(pos, head) for (pos = (head)->next; pos != (head); pos = pos->next)
#define list_for_each_safe(pos, tmp, head)                                                \
	for (pos = (head)->next, tmp = pos->next; pos != (head); pos = tmp, tmp = pos->next)

/* ------------------------------------------------------------------ objects */
struct soft_dev {
	struct ibv_device ibdev; /* what applications hold (first member) */
	int index;
	uint8_t link_layer;      /* IBV_LINK_LAYER_INFINIBAND / _ETHERNET */
	uint16_t lid;            /* InfiniBand LID (0 on Ethernet) */
	uint64_t node_guid;      /* host order */
	int ngids;
	union ibv_gid gids[SOFT_GID_TBL_LEN];
	uint32_t gid_types[SOFT_GID_TBL_LEN]; /* enum ibv_gid_type */
	enum ibv_mtu max_mtu, active_mtu;
	uint32_t max_msg_sz;
	int port_down;
};

struct soft_ctx {
	struct verbs_context vctx; /* first: ibv_context sits at its end */
	struct soft_dev *dev;
	int async_wfd;             /* write end of the async event pipe */
	int dead;                  /* the process forked: this context is the parent's */
	pthread_mutex_t lock;      /* the object lists below */
	struct soft_list pds, mrs, cqs, qps, channels;
	int npd, nmr, ncq, nqp;
};

struct soft_pd {
	struct ibv_pd pd;
	struct soft_ctx *ctx;
	struct soft_list link;
	int users; /* MRs and QPs in it (ctx->lock) */
};

struct soft_mr {
	struct ibv_mr mr;
	struct soft_pd *pd;
	struct soft_list link;
	struct soft_mr *hnext; /* key hash chain (mr_lock) */
	uint64_t addr, len;
	uint64_t iova; /* what peers address the first byte as */
	int access;
	uint64_t pinned_pages;
	uint32_t key;
};

struct soft_channel {
	struct ibv_comp_channel ch;
	struct soft_ctx *ctx;
	struct soft_list link;
	int wfd; /* write end of the event pipe */
};

struct soft_cq {
	struct ibv_cq cq;
	struct soft_ctx *ctx;
	struct soft_list link;
	pthread_mutex_t lock;     /* the ring and the flags below */
	struct ibv_wc *ring;
	uint8_t *ring_flags;      /* per entry: solicited */
	uint32_t cap, head, count;
	int armed, solicited_only;
	int overrun;
	int users;                /* QPs using it (ctx->lock) */
	uint32_t events_reported; /* events handed out by ibv_get_cq_event */
	uint32_t async_reported;
};

/* A send work request as the NIC keeps it. */
enum wqe_state { WQE_POSTED, WQE_SENDING, WQE_SENT, WQE_DONE };
struct swqe {
	uint64_t wr_id;
	enum ibv_wr_opcode opcode;
	unsigned int flags;
	uint32_t imm; /* network order, as posted */
	uint64_t remote_addr;
	uint32_t rkey;
	uint64_t compare_add, swap;
	int num_sge;
	struct ibv_sge *sge;  /* points into the QP's SGE pool */
	uint8_t *inline_data; /* IBV_SEND_INLINE: copied at post time */
	uint64_t total;
	/* NIC state */
	enum wqe_state state;
	int signaled;
	int validated;
	uint32_t psn, npkts;
	uint64_t sent;     /* request payload bytes handed to the wire */
	uint64_t received; /* READ response bytes landed */
	enum ibv_wc_status status;
	uint32_t vendor_err;
};

struct rwqe {
	uint64_t wr_id;
	int num_sge;
	struct ibv_sge *sge;
	uint64_t total;
};

struct conn;

/* What an epoll event points at. */
enum fdh_kind { FDH_EVENT, FDH_TIMER, FDH_LISTEN, FDH_CONN };
struct soft_fdh {
	enum fdh_kind kind;
	void *obj;
};

struct soft_qp {
	struct ibv_qp qp;
	struct soft_ctx *ctx;
	struct soft_pd *pd;
	struct soft_cq *scq, *rcq;
	struct soft_list link;     /* ctx->qps */
	struct soft_list nic_link; /* NIC's list of QPs with work */
	pthread_mutex_t lock;      /* everything below, app threads and the NIC */
	enum ibv_qp_state state;
	uint32_t gen;              /* bumped on RESET / ERR / destroy */
	struct ibv_qp_cap cap;
	int sq_sig_all;
	/* attributes */
	uint8_t port, timeout, retry_cnt, rnr_retry, min_rnr_timer;
	uint8_t max_rd_atomic, max_dest_rd_atomic, en_sqd_async_notify;
	uint16_t pkey_index;
	unsigned int access;
	enum ibv_mtu path_mtu;
	uint32_t dest_qpn, rq_psn, sq_psn;
	struct ibv_ah_attr av;
	/* queues */
	struct swqe *sq;
	struct ibv_sge *sq_sge;
	uint8_t *sq_inline;
	uint32_t sq_head, sq_tx, sq_tail; /* monotonic counters, index = n % cap */
	struct rwqe *rq;
	struct ibv_sge *rq_sge;
	uint32_t rq_head, rq_tail;
	int rq_busy; /* the head receive is being filled */
	/* requester state (NIC) */
	struct conn *req;
	uint32_t next_psn;
	int rd_outstanding;
	int retry_left, rnr_left;
	int waiting;           /* a retransmission timer is pending */
	uint64_t last_due_sq, last_due_rq;
	/* responder state (NIC) */
	int listen_fd;
	struct soft_fdh lfdh;
	struct soft_list resp_conns;
	uint32_t epsn;
	int comm_est;
	int sqd_notified;
	struct soft_list all_link; /* the NIC's list of every QP */
	/* bookkeeping */
	int on_nic_list;
	int nic_known;      /* the NIC has taken the listener */
	int destroying;
	uint32_t async_reported;
};

/* ------------------------------------------------------------------ helpers */
static inline struct soft_ctx *to_ctx(struct ibv_context *c)
{
	return container_of(c, struct soft_ctx, vctx.context);
}
static inline struct soft_dev *to_dev(struct ibv_device *d) { return (struct soft_dev *)d; }
static inline struct soft_pd *to_pd(struct ibv_pd *p) { return (struct soft_pd *)p; }
static inline struct soft_mr *to_mr(struct ibv_mr *m) { return (struct soft_mr *)m; }
static inline struct soft_cq *to_cq(struct ibv_cq *c) { return (struct soft_cq *)c; }
static inline struct soft_qp *to_qp(struct ibv_qp *q) { return (struct soft_qp *)q; }
static inline struct soft_channel *to_channel(struct ibv_comp_channel *c)
{
	return (struct soft_channel *)c;
}

static inline uint32_t mtu_bytes(enum ibv_mtu m) { return 128u << m; }
static inline uint32_t psn_add(uint32_t p, uint32_t n) { return (p + n) & 0xffffff; }
/* (a - b) mod 2^24 */
static inline uint32_t psn_diff(uint32_t a, uint32_t b) { return (a - b) & 0xffffff; }

const char *soft_opcode_str(enum ibv_wr_opcode op);
const char *soft_qp_state_str(enum ibv_qp_state s);

/* devices (device.c) */
int soft_devices(struct soft_dev ***out);
struct soft_dev *soft_dev_by_index(int i);
int soft_gid_lookup(const struct soft_dev *d, const union ibv_gid *gid, uint32_t *type);

/* memory regions (device.c): lookups the NIC makes, under the MR read lock */
void soft_mr_rdlock(void);
void soft_mr_unlock(void);
struct soft_mr *soft_mr_find(uint32_t key); /* caller holds the read lock */

/* completions and events (device.c) */
void soft_cq_push(struct soft_cq *cq, const struct ibv_wc *wc, int solicited);
void soft_async_event(struct soft_ctx *ctx, enum ibv_event_type type, uint64_t element);

/* the NIC (nic.c) */
int soft_nic_start(void);
void soft_nic_doorbell(struct soft_qp *qp);
int soft_nic_kick_locked(struct soft_qp *qp);
void soft_nic_qp_add(struct soft_qp *qp);
void soft_nic_qp_changed(struct soft_qp *qp);
void soft_nic_qp_remove(struct soft_qp *qp);
void soft_nic_cq_overrun(struct soft_cq *cq);
void soft_nic_after_fork(void);
/* QP creation (qp.c) uses this to pick the QPN and listen on it. */
int soft_qp_listen(uint32_t *qpn_out);
void soft_qp_flush_locked(struct soft_qp *qp);
void soft_qp_sqd_check_locked(struct soft_qp *qp);
void soft_qp_after_fork(void);
#endif
