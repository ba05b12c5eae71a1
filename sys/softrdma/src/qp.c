/* softrdma: queue pairs. Creation, the RC state machine with the kernel's attribute
 * rules (ib_modify_qp_is_ok), queries, destruction, and posting work requests. */
#include "soft.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

void soft_qp_register(struct soft_ctx *ctx, struct soft_qp *qp);
void soft_qp_unregister(struct soft_qp *qp);

/* ------------------------------------------------------------------ state table */
/* The RC column of the kernel's qp_state_table (drivers/infiniband/core/verbs.c). */
struct transition {
	int valid;
	int req, opt;
};

static struct transition rc_transition(enum ibv_qp_state cur, enum ibv_qp_state next)
{
	struct transition t = {0, 0, 0};
	if (next == IBV_QPS_RESET || (next == IBV_QPS_ERR && cur != IBV_QPS_RESET)) {
		/* From every state, with no attributes; but RESET -> ERR is not in the
		 * kernel's table (a QP in RESET has no work to flush). */
		t.valid = 1;
		return t;
	}
	switch (cur) {
	case IBV_QPS_RESET:
		if (next == IBV_QPS_INIT)
			t = (struct transition){1,
						IBV_QP_PKEY_INDEX | IBV_QP_PORT |
							IBV_QP_ACCESS_FLAGS,
						0};
		break;
	case IBV_QPS_INIT:
		if (next == IBV_QPS_INIT)
			t = (struct transition){1, 0,
						IBV_QP_PKEY_INDEX | IBV_QP_PORT |
							IBV_QP_ACCESS_FLAGS};
		else if (next == IBV_QPS_RTR)
			t = (struct transition){
				1,
				IBV_QP_AV | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN |
					IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_MIN_RNR_TIMER,
				IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX};
		break;
	case IBV_QPS_RTR:
		if (next == IBV_QPS_RTS)
			t = (struct transition){
				1,
				IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY |
					IBV_QP_SQ_PSN | IBV_QP_MAX_QP_RD_ATOMIC,
				IBV_QP_CUR_STATE | IBV_QP_ALT_PATH | IBV_QP_ACCESS_FLAGS |
					IBV_QP_MIN_RNR_TIMER | IBV_QP_PATH_MIG_STATE};
		break;
	case IBV_QPS_RTS:
		if (next == IBV_QPS_RTS)
			t = (struct transition){1, 0,
						IBV_QP_CUR_STATE | IBV_QP_ACCESS_FLAGS |
							IBV_QP_ALT_PATH | IBV_QP_PATH_MIG_STATE |
							IBV_QP_MIN_RNR_TIMER};
		else if (next == IBV_QPS_SQD)
			t = (struct transition){1, 0, IBV_QP_EN_SQD_ASYNC_NOTIFY};
		break;
	case IBV_QPS_SQD:
		if (next == IBV_QPS_RTS)
			t = (struct transition){1, 0,
						IBV_QP_CUR_STATE | IBV_QP_ALT_PATH |
							IBV_QP_ACCESS_FLAGS | IBV_QP_MIN_RNR_TIMER |
							IBV_QP_PATH_MIG_STATE};
		else if (next == IBV_QPS_SQD)
			t = (struct transition){
				1, 0,
				IBV_QP_PORT | IBV_QP_AV | IBV_QP_TIMEOUT | IBV_QP_RETRY_CNT |
					IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC |
					IBV_QP_MAX_DEST_RD_ATOMIC | IBV_QP_ALT_PATH |
					IBV_QP_ACCESS_FLAGS | IBV_QP_PKEY_INDEX |
					IBV_QP_MIN_RNR_TIMER | IBV_QP_PATH_MIG_STATE};
		break;
	default: break;
	}
	return t;
}

static const char *mask_names(int mask, char *buf, size_t size)
{
	static const char *const names[] = {
		"STATE",   "CUR_STATE",	  "EN_SQD_ASYNC_NOTIFY", "ACCESS_FLAGS", "PKEY_INDEX",
		"PORT",	   "QKEY",	  "AV",			 "PATH_MTU",	 "TIMEOUT",
		"RETRY_CNT", "RNR_RETRY", "RQ_PSN",		 "MAX_QP_RD_ATOMIC",
		"ALT_PATH", "MIN_RNR_TIMER", "SQ_PSN",		 "MAX_DEST_RD_ATOMIC",
		"PATH_MIG_STATE", "CAP",  "DEST_QPN",		 "bit21",	 "bit22",
		"bit23",   "bit24",	  "RATE_LIMIT"};
	size_t n = 0;
	buf[0] = 0;
	for (int b = 0; b < 31; b++)
		if (mask & (1 << b)) {
			const char *nm = b < (int)(sizeof names / sizeof names[0]) ? names[b] : "?";
			int w = snprintf(buf + n, size - n, "%s%s", n ? "|" : "", nm);
			if (w < 0 || (size_t)w >= size - n)
				break;
			n += (size_t)w;
		}
	return buf;
}

/* ------------------------------------------------------------------ create */
static int qp_counts;
static pthread_mutex_t qp_count_lock = PTHREAD_MUTEX_INITIALIZER;

/* In a forked child: the parent's QPs are not the child's (their contexts are dead),
 * and the count's lock may have been held by a thread that does not exist here. */
void soft_qp_after_fork(void)
{
	pthread_mutex_init(&qp_count_lock, NULL);
	qp_counts = 0;
}

static void qp_free_arrays(struct soft_qp *qp)
{
	free(qp->sq);
	free(qp->sq_sge);
	free(qp->sq_inline);
	free(qp->rq);
	free(qp->rq_sge);
}

static struct ibv_qp *create_qp(struct ibv_pd *ibpd, struct ibv_qp_init_attr *a)
{
	struct soft_pd *pd = to_pd(ibpd);
	struct soft_ctx *ctx = pd->ctx;
	int err = 0;
	const char *why = "";
	if (ctx->dead) {
		err = EIO;
		why = "context of the parent process";
	} else if (a->qp_type != IBV_QPT_RC) {
		err = EOPNOTSUPP;
		why = "only reliable-connected (RC) queue pairs are emulated";
	} else if (!a->send_cq || !a->recv_cq) {
		err = EINVAL;
		why = "send_cq and recv_cq are required";
	} else if (a->send_cq->context != ibpd->context || a->recv_cq->context != ibpd->context) {
		err = EINVAL;
		why = "completion queue of another context";
	} else if (a->srq) {
		err = EOPNOTSUPP;
		why = "no shared receive queues";
	} else if (a->cap.max_send_wr > SOFT_MAX_QP_WR || a->cap.max_recv_wr > SOFT_MAX_QP_WR) {
		err = EINVAL;
		why = "more work requests than max_qp_wr";
	} else if (a->cap.max_send_sge > SOFT_MAX_SGE || a->cap.max_recv_sge > SOFT_MAX_SGE) {
		err = EINVAL;
		why = "more scatter/gather entries than max_sge";
	} else if (a->cap.max_inline_data > SOFT_MAX_INLINE) {
		err = EINVAL;
		why = "max_inline_data above the device's 256 bytes";
	}
	if (err) {
		TRACE("ibv_create_qp(pd %u, type %d, send_wr %u recv_wr %u send_sge %u recv_sge %u "
		      "inline %u) = NULL: %s (%s)",
		      ibpd->handle, (int)a->qp_type, a->cap.max_send_wr, a->cap.max_recv_wr,
		      a->cap.max_send_sge, a->cap.max_recv_sge, a->cap.max_inline_data,
		      strerror(err), why);
		errno = err;
		return NULL;
	}
	pthread_mutex_lock(&qp_count_lock);
	if (qp_counts >= SOFT_MAX_QP) {
		pthread_mutex_unlock(&qp_count_lock);
		errno = ENOMEM;
		return NULL;
	}
	qp_counts++;
	pthread_mutex_unlock(&qp_count_lock);

	struct soft_qp *qp = calloc(1, sizeof *qp);
	uint32_t sw = a->cap.max_send_wr ? a->cap.max_send_wr : 1;
	uint32_t rw = a->cap.max_recv_wr ? a->cap.max_recv_wr : 1;
	uint32_t ss = a->cap.max_send_sge ? a->cap.max_send_sge : 1;
	uint32_t rs = a->cap.max_recv_sge ? a->cap.max_recv_sge : 1;
	if (qp) {
		qp->sq = calloc(sw, sizeof *qp->sq);
		qp->sq_sge = calloc((size_t)sw * ss, sizeof *qp->sq_sge);
		if (a->cap.max_inline_data)
			qp->sq_inline = calloc(sw, a->cap.max_inline_data);
		qp->rq = calloc(rw, sizeof *qp->rq);
		qp->rq_sge = calloc((size_t)rw * rs, sizeof *qp->rq_sge);
	}
	if (!qp || !qp->sq || !qp->sq_sge || (a->cap.max_inline_data && !qp->sq_inline) ||
	    !qp->rq || !qp->rq_sge) {
		if (qp)
			qp_free_arrays(qp);
		free(qp);
		goto nomem;
	}
	for (uint32_t i = 0; i < sw; i++) {
		qp->sq[i].sge = &qp->sq_sge[(size_t)i * ss];
		if (qp->sq_inline)
			qp->sq[i].inline_data = &qp->sq_inline[(size_t)i * a->cap.max_inline_data];
	}
	for (uint32_t i = 0; i < rw; i++)
		qp->rq[i].sge = &qp->rq_sge[(size_t)i * rs];
	uint32_t qpn;
	int lfd = soft_qp_listen(&qpn);
	if (lfd < 0) {
		int e = errno;
		qp_free_arrays(qp);
		free(qp);
		pthread_mutex_lock(&qp_count_lock);
		qp_counts--;
		pthread_mutex_unlock(&qp_count_lock);
		TRACE("ibv_create_qp = NULL: no queue pair number: %s", strerror(e));
		errno = e;
		return NULL;
	}
	qp->listen_fd = lfd;
	qp->ctx = ctx;
	qp->pd = pd;
	qp->scq = to_cq(a->send_cq);
	qp->rcq = to_cq(a->recv_cq);
	qp->cap = a->cap;
	qp->sq_sig_all = a->sq_sig_all;
	qp->state = IBV_QPS_RESET;
	qp->port = 1;
	qp->path_mtu = IBV_MTU_1024;
	list_init(&qp->resp_conns);
	list_init(&qp->nic_link);
	pthread_mutex_init(&qp->lock, NULL);
	static uint32_t next_handle;
	struct ibv_qp *q = &qp->qp;
	q->context = ibpd->context;
	q->qp_context = a->qp_context;
	q->pd = ibpd;
	q->send_cq = a->send_cq;
	q->recv_cq = a->recv_cq;
	q->srq = NULL;
	q->handle = __atomic_add_fetch(&next_handle, 1, __ATOMIC_RELAXED);
	q->qp_num = qpn;
	q->state = IBV_QPS_RESET;
	q->qp_type = IBV_QPT_RC;
	pthread_mutex_init(&q->mutex, NULL);
	pthread_cond_init(&q->cond, NULL);
	q->events_completed = 0;
	pthread_mutex_lock(&ctx->lock);
	pd->users++;
	qp->scq->users++;
	qp->rcq->users++;
	ctx->nqp++;
	soft_qp_register(ctx, qp);
	pthread_mutex_unlock(&ctx->lock);
	soft_nic_qp_add(qp);
	TRACE("ibv_create_qp(pd %u, RC, send_wr %u recv_wr %u send_sge %u recv_sge %u inline "
	      "%u, sig_all %d) = qpn %#x",
	      ibpd->handle, a->cap.max_send_wr, a->cap.max_recv_wr, a->cap.max_send_sge,
	      a->cap.max_recv_sge, a->cap.max_inline_data, a->sq_sig_all, qpn);
	return q;
nomem:
	pthread_mutex_lock(&qp_count_lock);
	qp_counts--;
	pthread_mutex_unlock(&qp_count_lock);
	errno = ENOMEM;
	return NULL;
}

EXPORT struct ibv_qp *ibv_create_qp(struct ibv_pd *pd, struct ibv_qp_init_attr *attr)
{
	return create_qp(pd, attr);
}

struct ibv_qp *soft_create_qp_ex(struct ibv_context *context, struct ibv_qp_init_attr_ex *a)
{
	if (!(a->comp_mask & IBV_QP_INIT_ATTR_PD) || !a->pd || a->pd->context != context) {
		errno = EINVAL;
		return NULL;
	}
	if (a->comp_mask & ~(uint32_t)IBV_QP_INIT_ATTR_PD) {
		TRACE("ibv_create_qp_ex: comp_mask %#x beyond PD is not supported", a->comp_mask);
		errno = EOPNOTSUPP;
		return NULL;
	}
	struct ibv_qp_init_attr b;
	memset(&b, 0, sizeof b);
	b.qp_context = a->qp_context;
	b.send_cq = a->send_cq;
	b.recv_cq = a->recv_cq;
	b.srq = a->srq;
	b.cap = a->cap;
	b.qp_type = a->qp_type;
	b.sq_sig_all = a->sq_sig_all;
	struct ibv_qp *q = create_qp(a->pd, &b);
	if (q)
		a->cap = b.cap;
	return q;
}

EXPORT struct ibv_qp_ex *ibv_qp_to_qp_ex(struct ibv_qp *qp)
{
	(void)qp;
	return NULL; /* no extended (ibv_wr_*) posting on this device */
}

EXPORT int ibv_query_qp_data_in_order(struct ibv_qp *qp, enum ibv_wr_opcode op, uint32_t flags)
{
	(void)qp;
	(void)op;
	(void)flags;
	return 0;
}

/* ------------------------------------------------------------------ modify */
#define QP_ACCESS_KNOWN                                                                  \
	(IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE | IBV_ACCESS_REMOTE_READ |     \
	 IBV_ACCESS_REMOTE_ATOMIC | IBV_ACCESS_MW_BIND)

static int check_av(struct soft_qp *qp, const struct ibv_ah_attr *av, const char **why)
{
	struct soft_dev *d = qp->ctx->dev;
	if (av->port_num != 1) {
		*why = "ah_attr.port_num is not a valid port (the device has port 1)";
		return EINVAL;
	}
	if (d->link_layer == IBV_LINK_LAYER_ETHERNET && !av->is_global) {
		*why = "RoCE needs a GRH: ah_attr.is_global must be 1";
		return EINVAL;
	}
	if (av->is_global) {
		if (av->grh.sgid_index >= SOFT_GID_TBL_LEN || av->grh.sgid_index >= d->ngids) {
			*why = "ah_attr.grh.sgid_index is not a valid GID table entry";
			return EINVAL;
		}
	}
	return 0;
}

EXPORT int ibv_modify_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *attr, int mask)
{
	struct soft_qp *qp = to_qp(ibqp);
	char b1[256], b2[256];
	const char *why = NULL;
	int err = 0;
	if (qp->ctx->dead) {
		errno = EIO;
		return EIO;
	}
	pthread_mutex_lock(&qp->lock);
	enum ibv_qp_state cur = (mask & IBV_QP_CUR_STATE) ? attr->cur_qp_state : qp->state;
	enum ibv_qp_state next = (mask & IBV_QP_STATE) ? attr->qp_state : cur;
	struct transition t = {0, 0, 0};
	if ((unsigned)cur > IBV_QPS_ERR || (unsigned)next > IBV_QPS_ERR) {
		err = EINVAL;
		why = "state out of range";
	} else if ((mask & IBV_QP_CUR_STATE) && cur != IBV_QPS_RTR && cur != IBV_QPS_RTS &&
		   cur != IBV_QPS_SQD && cur != IBV_QPS_SQE) {
		err = EINVAL;
		why = "IBV_QP_CUR_STATE is only allowed from RTR, RTS, SQD or SQE";
	} else {
		t = rc_transition(cur, next);
		if (!t.valid) {
			err = EINVAL;
			why = "no such transition for an RC queue pair";
		} else if ((mask & t.req) != t.req) {
			err = EINVAL;
			snprintf(b2, sizeof b2, "missing required attributes %s",
				 mask_names(t.req & ~mask, b1, sizeof b1));
			why = b2;
		} else if (mask & ~(t.req | t.opt | IBV_QP_STATE)) {
			err = EINVAL;
			snprintf(b2, sizeof b2, "attributes not allowed in this transition: %s",
				 mask_names(mask & ~(t.req | t.opt | IBV_QP_STATE), b1, sizeof b1));
			why = b2;
		}
	}
	struct soft_dev *d = qp->ctx->dev;
	if (!err && (mask & IBV_QP_PORT) && attr->port_num != 1) {
		err = EINVAL;
		why = "port_num is not a valid port";
	}
	if (!err && (mask & IBV_QP_PKEY_INDEX) && attr->pkey_index >= 1) {
		err = EINVAL;
		why = "pkey_index beyond the P_Key table (1 entry)";
	}
	if (!err && (mask & IBV_QP_AV))
		err = check_av(qp, &attr->ah_attr, &why);
	if (!err && (mask & IBV_QP_PATH_MTU) &&
	    (attr->path_mtu < IBV_MTU_256 || attr->path_mtu > d->max_mtu)) {
		err = EINVAL;
		why = "path_mtu is not a valid MTU of the port";
	}
	if (!err && (mask & IBV_QP_TIMEOUT) && attr->timeout > 31) {
		err = EINVAL;
		why = "timeout above 31";
	}
	if (!err && (mask & IBV_QP_RETRY_CNT) && attr->retry_cnt > 7) {
		err = EINVAL;
		why = "retry_cnt above 7";
	}
	if (!err && (mask & IBV_QP_RNR_RETRY) && attr->rnr_retry > 7) {
		err = EINVAL;
		why = "rnr_retry above 7";
	}
	if (!err && (mask & IBV_QP_MIN_RNR_TIMER) && attr->min_rnr_timer > 31) {
		err = EINVAL;
		why = "min_rnr_timer above 31";
	}
	if (!err && (mask & IBV_QP_MAX_QP_RD_ATOMIC) && attr->max_rd_atomic > SOFT_MAX_RD_ATOM) {
		err = EINVAL;
		why = "max_rd_atomic above the device's max_qp_init_rd_atom";
	}
	if (!err && (mask & IBV_QP_MAX_DEST_RD_ATOMIC) &&
	    attr->max_dest_rd_atomic > SOFT_MAX_RD_ATOM) {
		err = EINVAL;
		why = "max_dest_rd_atomic above the device's max_qp_rd_atom";
	}
	if (!err && (mask & IBV_QP_ACCESS_FLAGS) && (attr->qp_access_flags & ~QP_ACCESS_KNOWN)) {
		err = EINVAL;
		why = "unknown qp_access_flags";
	}
	if (err) {
		pthread_mutex_unlock(&qp->lock);
		TRACE("ibv_modify_qp(qpn %#x, %s -> %s, mask %s) = EINVAL: %s", ibqp->qp_num,
		      soft_qp_state_str(cur), soft_qp_state_str(next),
		      mask_names(mask, b1, sizeof b1), why);
		return err;
	}
	if (mask & IBV_QP_PORT)
		qp->port = attr->port_num;
	if (mask & IBV_QP_PKEY_INDEX)
		qp->pkey_index = attr->pkey_index;
	if (mask & IBV_QP_ACCESS_FLAGS)
		qp->access = attr->qp_access_flags;
	if (mask & IBV_QP_AV)
		qp->av = attr->ah_attr;
	if (mask & IBV_QP_PATH_MTU)
		qp->path_mtu = attr->path_mtu;
	if (mask & IBV_QP_DEST_QPN)
		qp->dest_qpn = attr->dest_qp_num & 0xffffff;
	if (mask & IBV_QP_RQ_PSN)
		qp->rq_psn = attr->rq_psn & 0xffffff;
	if (mask & IBV_QP_SQ_PSN)
		qp->sq_psn = attr->sq_psn & 0xffffff;
	if (mask & IBV_QP_TIMEOUT)
		qp->timeout = attr->timeout;
	if (mask & IBV_QP_RETRY_CNT)
		qp->retry_cnt = attr->retry_cnt;
	if (mask & IBV_QP_RNR_RETRY)
		qp->rnr_retry = attr->rnr_retry;
	if (mask & IBV_QP_MIN_RNR_TIMER)
		qp->min_rnr_timer = attr->min_rnr_timer;
	if (mask & IBV_QP_MAX_QP_RD_ATOMIC)
		qp->max_rd_atomic = attr->max_rd_atomic;
	if (mask & IBV_QP_MAX_DEST_RD_ATOMIC)
		qp->max_dest_rd_atomic = attr->max_dest_rd_atomic;
	if (mask & IBV_QP_EN_SQD_ASYNC_NOTIFY)
		qp->en_sqd_async_notify = attr->en_sqd_async_notify;
	enum ibv_qp_state old = qp->state;
	if (mask & IBV_QP_STATE) {
		switch (next) {
		case IBV_QPS_RESET:
			/* Outstanding work is discarded without completions. */
			qp->gen++;
			qp->sq_head = qp->sq_tx = qp->sq_tail = 0;
			qp->rq_head = qp->rq_tail = 0;
			qp->rq_busy = 0;
			qp->rd_outstanding = 0;
			qp->waiting = 0;
			qp->comm_est = 0;
			qp->access = 0;
			break;
		case IBV_QPS_ERR:
			if (old != IBV_QPS_ERR) {
				qp->gen++;
				qp->state = IBV_QPS_ERR;
				soft_qp_flush_locked(qp);
			}
			break;
		case IBV_QPS_RTR:
			if (old == IBV_QPS_INIT)
				qp->epsn = qp->rq_psn;
			break;
		case IBV_QPS_RTS:
			if (old == IBV_QPS_RTR) {
				qp->next_psn = qp->sq_psn;
				qp->retry_left = qp->retry_cnt;
				qp->rnr_left = qp->rnr_retry;
			}
			break;
		default: break;
		}
		qp->state = next;
		if (next == IBV_QPS_SQD && old == IBV_QPS_RTS) {
			/* Each drain is announced once; one that has nothing to wait for is
			 * drained at once, as on a real device. */
			qp->sqd_notified = 0;
			soft_qp_sqd_check_locked(qp);
		}
	}
	pthread_mutex_unlock(&qp->lock);
	if (mask & IBV_QP_STATE)
		ibqp->state = next; /* the real library updates the public field itself */
	TRACE("ibv_modify_qp(qpn %#x, %s -> %s, mask %s) = 0%s", ibqp->qp_num,
	      soft_qp_state_str(old), soft_qp_state_str(next), mask_names(mask, b1, sizeof b1),
	      (mask & IBV_QP_AV) ? "" : "");
	if ((mask & IBV_QP_AV) && soft_cfg.trace) {
		const struct ibv_ah_attr *av = &qp->av;
		TRACE("  qpn %#x -> dest qpn %#x dlid %u global %d dgid %02x%02x..%02x%02x sgid "
		      "index %u, mtu %u, rq_psn %#x",
		      ibqp->qp_num, qp->dest_qpn, av->dlid, av->is_global, av->grh.dgid.raw[0],
		      av->grh.dgid.raw[1], av->grh.dgid.raw[14], av->grh.dgid.raw[15],
		      av->grh.sgid_index, mtu_bytes(qp->path_mtu), qp->rq_psn);
	}
	soft_nic_qp_changed(qp);
	return 0;
}

EXPORT int ibv_query_qp(struct ibv_qp *ibqp, struct ibv_qp_attr *attr, int attr_mask,
			struct ibv_qp_init_attr *init)
{
	struct soft_qp *qp = to_qp(ibqp);
	if (qp->ctx->dead)
		return EIO;
	pthread_mutex_lock(&qp->lock);
	memset(attr, 0, sizeof *attr);
	attr->qp_state = qp->state;
	attr->cur_qp_state = qp->state;
	attr->path_mtu = qp->path_mtu;
	attr->path_mig_state = IBV_MIG_MIGRATED;
	attr->rq_psn = qp->state >= IBV_QPS_RTR ? qp->epsn : qp->rq_psn;
	attr->sq_psn = qp->state >= IBV_QPS_RTS ? qp->next_psn : qp->sq_psn;
	attr->dest_qp_num = qp->dest_qpn;
	attr->qp_access_flags = qp->access;
	attr->cap = qp->cap;
	attr->ah_attr = qp->av;
	attr->pkey_index = qp->pkey_index;
	attr->en_sqd_async_notify = qp->en_sqd_async_notify;
	attr->sq_draining = qp->state == IBV_QPS_SQD && qp->sq_tx != qp->sq_head;
	attr->max_rd_atomic = qp->max_rd_atomic;
	attr->max_dest_rd_atomic = qp->max_dest_rd_atomic;
	attr->min_rnr_timer = qp->min_rnr_timer;
	attr->port_num = qp->port;
	attr->timeout = qp->timeout;
	attr->retry_cnt = qp->retry_cnt;
	attr->rnr_retry = qp->rnr_retry;
	if (init) {
		memset(init, 0, sizeof *init);
		init->qp_context = ibqp->qp_context;
		init->send_cq = ibqp->send_cq;
		init->recv_cq = ibqp->recv_cq;
		init->cap = qp->cap;
		init->qp_type = IBV_QPT_RC;
		init->sq_sig_all = qp->sq_sig_all;
	}
	pthread_mutex_unlock(&qp->lock);
	/* The real ibv_query_qp refreshes the public field too: a QP the device moved to
	 * ERR reads as ERR in ibv_qp::state after a query. */
	if (attr_mask & IBV_QP_STATE)
		ibqp->state = attr->qp_state;
	return 0;
}

/* ------------------------------------------------------------------ destroy */
int soft_destroy_qp_internal(struct soft_qp *qp, int wait_events)
{
	struct soft_ctx *ctx = qp->ctx;
	uint32_t qpn = qp->qp.qp_num;
	pthread_mutex_lock(&qp->lock);
	qp->destroying = 1;
	qp->gen++;
	qp->state = IBV_QPS_RESET;
	pthread_mutex_unlock(&qp->lock);
	/* Synchronous: when it returns the NIC holds no reference to the QP or its
	 * buffers, its QPN is free, and its peers' connections are closed. */
	soft_nic_qp_remove(qp);
	soft_qp_unregister(qp);
	/* Like the real library: wait (without bound) for every async event handed out
	 * about this QP to be acknowledged. */
	pthread_mutex_lock(&qp->qp.mutex);
	uint64_t t0 = soft_now_ns();
	int warned = 0;
	while (wait_events && qp->qp.events_completed != qp->async_reported) {
		struct timespec ts;
		clock_gettime(CLOCK_REALTIME, &ts);
		ts.tv_sec += 1;
		pthread_cond_timedwait(&qp->qp.cond, &qp->qp.mutex, &ts);
		if (!warned && soft_now_ns() - t0 > 1000000000ull) {
			soft_warn("ibv_destroy_qp(qpn %#x) is waiting for %u unacknowledged async "
				  "events (ibv_ack_async_event); the real library waits forever too",
				  qpn, qp->async_reported - qp->qp.events_completed);
			warned = 1;
		}
	}
	pthread_mutex_unlock(&qp->qp.mutex);
	pthread_mutex_lock(&ctx->lock);
	qp->pd->users--;
	qp->scq->users--;
	qp->rcq->users--;
	ctx->nqp--;
	pthread_mutex_unlock(&ctx->lock);
	pthread_mutex_lock(&qp_count_lock);
	qp_counts--;
	pthread_mutex_unlock(&qp_count_lock);
	qp_free_arrays(qp);
	free(qp);
	TRACE("ibv_destroy_qp(qpn %#x) = 0", qpn);
	return 0;
}

EXPORT int ibv_destroy_qp(struct ibv_qp *qp)
{
	/* A child's copy of its parent's QP: its sockets belong to the parent's NIC, and
	 * their descriptor numbers may be the child's own files by now. */
	if (to_qp(qp)->ctx->dead)
		return EIO;
	return soft_destroy_qp_internal(to_qp(qp), 1);
}

/* ------------------------------------------------------------------ post */
static const char *post_state_err(enum ibv_qp_state s)
{
	switch (s) {
	case IBV_QPS_RESET: return "queue pair in RESET";
	case IBV_QPS_INIT: return "queue pair in INIT (sends need RTS)";
	case IBV_QPS_RTR: return "queue pair in RTR (sends need RTS)";
	default: return NULL;
	}
}

int soft_post_send(struct ibv_qp *ibqp, struct ibv_send_wr *wr, struct ibv_send_wr **bad)
{
	struct soft_qp *qp = to_qp(ibqp);
	int err = 0, posted = 0;
	const char *why = NULL;
	if (qp->ctx->dead) {
		*bad = wr;
		return EIO;
	}
	pthread_mutex_lock(&qp->lock);
	for (; wr; wr = wr->next) {
		why = post_state_err(qp->state);
		if (why) {
			err = EINVAL;
			break;
		}
		if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_send_sge) {
			err = EINVAL;
			why = "num_sge above the queue pair's max_send_sge";
			break;
		}
		switch (wr->opcode) {
		case IBV_WR_RDMA_WRITE:
		case IBV_WR_RDMA_WRITE_WITH_IMM:
		case IBV_WR_SEND:
		case IBV_WR_SEND_WITH_IMM:
		case IBV_WR_RDMA_READ:
		case IBV_WR_ATOMIC_CMP_AND_SWP:
		case IBV_WR_ATOMIC_FETCH_AND_ADD: break;
		default: err = EINVAL; why = "opcode not supported on an RC queue pair of this device";
		}
		if (err)
			break;
		if (wr->send_flags & ~(unsigned)(IBV_SEND_FENCE | IBV_SEND_SIGNALED |
						 IBV_SEND_SOLICITED | IBV_SEND_INLINE)) {
			err = EINVAL;
			why = "send_flags not valid for RC";
			break;
		}
		if (qp->sq_tail - qp->sq_head >= qp->cap.max_send_wr) {
			err = ENOMEM;
			why = "send queue full (max_send_wr outstanding)";
			break;
		}
		uint64_t total = 0;
		for (int i = 0; i < wr->num_sge; i++)
			total += wr->sg_list[i].length;
		int is_atomic = wr->opcode == IBV_WR_ATOMIC_CMP_AND_SWP ||
				wr->opcode == IBV_WR_ATOMIC_FETCH_AND_ADD;
		if (is_atomic && (wr->num_sge != 1 || wr->sg_list[0].length != 8)) {
			err = EINVAL;
			why = "atomics take one 8-byte scatter/gather entry";
			break;
		}
		if (wr->send_flags & IBV_SEND_INLINE) {
			if (wr->opcode == IBV_WR_RDMA_READ || is_atomic) {
				err = EINVAL;
				why = "IBV_SEND_INLINE with a READ or atomic";
				break;
			}
			if (total > qp->cap.max_inline_data) {
				err = EINVAL;
				why = "inline data longer than max_inline_data";
				break;
			}
		}
		struct swqe *w = &qp->sq[qp->sq_tail % qp->cap.max_send_wr];
		w->wr_id = wr->wr_id;
		w->opcode = wr->opcode;
		w->flags = wr->send_flags;
		w->imm = wr->imm_data;
		if (is_atomic) {
			w->remote_addr = wr->wr.atomic.remote_addr;
			w->rkey = wr->wr.atomic.rkey;
			w->compare_add = wr->wr.atomic.compare_add;
			w->swap = wr->wr.atomic.swap;
		} else {
			w->remote_addr = wr->wr.rdma.remote_addr;
			w->rkey = wr->wr.rdma.rkey;
		}
		w->total = total;
		if (wr->send_flags & IBV_SEND_INLINE) {
			/* The data is copied now; lkeys are not looked at. */
			uint64_t at = 0;
			for (int i = 0; i < wr->num_sge; i++) {
				memcpy(w->inline_data + at, (void *)(uintptr_t)wr->sg_list[i].addr,
				       wr->sg_list[i].length);
				at += wr->sg_list[i].length;
			}
			w->num_sge = 0;
		} else {
			w->num_sge = wr->num_sge;
			memcpy(w->sge, wr->sg_list, sizeof(struct ibv_sge) * (size_t)wr->num_sge);
		}
		w->state = WQE_POSTED;
		w->signaled = qp->sq_sig_all || (wr->send_flags & IBV_SEND_SIGNALED);
		w->validated = 0;
		w->sent = w->received = 0;
		w->status = IBV_WC_SUCCESS;
		w->vendor_err = 0;
		qp->sq_tail++;
		posted++;
		TRACE("ibv_post_send(qpn %#x): wr_id %#llx %s len %llu%s%s%s", ibqp->qp_num,
		      (unsigned long long)wr->wr_id, soft_opcode_str(wr->opcode),
		      (unsigned long long)total, w->signaled ? " signaled" : "",
		      (wr->send_flags & IBV_SEND_INLINE) ? " inline" : "",
		      (wr->send_flags & IBV_SEND_FENCE) ? " fence" : "");
	}
	/* Like a doorbell that starts the NIC's DMA at once: transmission may begin on this
	 * thread when the connection is up; completions still come only from the NIC. */
	int sent_here = posted && soft_nic_kick_locked(qp);
	pthread_mutex_unlock(&qp->lock);
	if (posted && !sent_here)
		soft_nic_doorbell(qp);
	if (err) {
		*bad = wr;
		TRACE("ibv_post_send(qpn %#x) = %s: %s (wr_id %#llx)", ibqp->qp_num, strerror(err),
		      why, (unsigned long long)wr->wr_id);
	}
	return err;
}

int soft_post_recv(struct ibv_qp *ibqp, struct ibv_recv_wr *wr, struct ibv_recv_wr **bad)
{
	struct soft_qp *qp = to_qp(ibqp);
	int err = 0, posted = 0;
	const char *why = NULL;
	if (qp->ctx->dead) {
		*bad = wr;
		return EIO;
	}
	pthread_mutex_lock(&qp->lock);
	for (; wr; wr = wr->next) {
		if (qp->state == IBV_QPS_RESET) {
			err = EINVAL;
			why = "queue pair in RESET (receives need INIT or later)";
			break;
		}
		if (wr->num_sge < 0 || (uint32_t)wr->num_sge > qp->cap.max_recv_sge) {
			err = EINVAL;
			why = "num_sge above the queue pair's max_recv_sge";
			break;
		}
		if (qp->rq_tail - qp->rq_head >= qp->cap.max_recv_wr) {
			err = ENOMEM;
			why = "receive queue full (max_recv_wr outstanding)";
			break;
		}
		struct rwqe *r = &qp->rq[qp->rq_tail % qp->cap.max_recv_wr];
		r->wr_id = wr->wr_id;
		r->num_sge = wr->num_sge;
		memcpy(r->sge, wr->sg_list, sizeof(struct ibv_sge) * (size_t)wr->num_sge);
		r->total = 0;
		for (int i = 0; i < wr->num_sge; i++)
			r->total += wr->sg_list[i].length;
		qp->rq_tail++;
		posted++;
		TRACE("ibv_post_recv(qpn %#x): wr_id %#llx len %llu", ibqp->qp_num,
		       (unsigned long long)wr->wr_id, (unsigned long long)r->total);
	}
	int in_err = qp->state == IBV_QPS_ERR;
	pthread_mutex_unlock(&qp->lock);
	if (posted && in_err)
		soft_nic_doorbell(qp); /* the NIC flushes them */
	if (err) {
		*bad = wr;
		TRACE("ibv_post_recv(qpn %#x) = %s: %s (wr_id %#llx)", ibqp->qp_num, strerror(err),
		      why, (unsigned long long)wr->wr_id);
	}
	return err;
}
