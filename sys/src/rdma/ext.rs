//! Extended verbs, dispatched the way rdma-core's `<infiniband/verbs.h>` does it.
//!
//! rdma-core marks a context that is the tail of a larger `struct verbs_context` (which
//! holds the extended operations: `query_port` with a size, `query_device_ex`,
//! `create_qp_ex`, ...) by setting `ibv_context::abi_compat` to `UINTPTR_MAX`
//! (`__VERBS_ABI_IS_EXTENDED`). rdma-sys 0.3's `verbs_get_ctx` compares it with
//! `u32::MAX` instead, so on a 64-bit machine every one of its extended inlines takes
//! the fallback path (and `ibv_create_qp_ex`, `ibv_create_cq_ex`, `ibv_query_device_ex`
//! would report "unsupported") against the real library. This module does the
//! dispatch itself, correctly, for what pserv uses; the device tests check it against a
//! library that sets `abi_compat` as rdma-core does (the software device of
//! `sys/softrdma`, and any real one).

use std::ptr::NonNull;

use rdma_sys as ffi;

/// rdma-core's `__VERBS_ABI_IS_EXTENDED`.
const VERBS_ABI_IS_EXTENDED: usize = usize::MAX;

/// The `verbs_context` around `ctx`, if the library gave an extended one
/// (`verbs_get_ctx` of verbs.h).
///
/// # Safety
///
/// `ctx` must be a live context returned by `ibv_open_device`.
pub(super) unsafe fn verbs_ctx(
    ctx: NonNull<ffi::ibv_context>,
) -> Option<NonNull<ffi::verbs_context>> {
    // SAFETY: the caller passes a live context; reading one pointer-sized field of it
    // is always defined.
    let compat = unsafe { (*ctx.as_ptr()).abi_compat } as usize;
    if compat != VERBS_ABI_IS_EXTENDED {
        return None;
    }
    let offset = std::mem::offset_of!(ffi::verbs_context, context);
    // SAFETY: an extended context is the last field of a `verbs_context` (that is what
    // `abi_compat == UINTPTR_MAX` promises), so stepping back by the field's offset
    // stays inside that allocation.
    let base = unsafe { ctx.as_ptr().cast::<u8>().sub(offset) };
    NonNull::new(base.cast::<ffi::verbs_context>())
}

/// Whether the `verbs_context` is large enough to hold the operation at byte offset
/// `op_offset` (`verbs_get_ctx_op`: the struct grows at its start, `sz` says how much the
/// library knows).
///
/// # Safety
///
/// `vctx` must come from [`verbs_ctx`] of a live context.
unsafe fn has_op(vctx: NonNull<ffi::verbs_context>, op_offset: usize) -> bool {
    // SAFETY: `sz` is a plain field of a live `verbs_context`.
    let sz = unsafe { (*vctx.as_ptr()).sz };
    sz >= std::mem::size_of::<ffi::verbs_context>() - op_offset
}

/// `ibv_query_port` as the header's inline does it: the extended `query_port` with the
/// full struct size when the library has it, else the exported compat symbol, which
/// fills only the first 48 bytes (the rest stays as the caller zeroed it). Returns the
/// errno-style result of the verb and whether the extended path was taken.
///
/// # Safety
///
/// `ctx` must be a live context and `attr` a live, writable, zeroed `ibv_port_attr`.
pub(super) unsafe fn query_port(
    ctx: NonNull<ffi::ibv_context>,
    port: u8,
    attr: &mut ffi::ibv_port_attr,
) -> (i32, bool) {
    // SAFETY: `ctx` is live (caller).
    if let Some(vctx) = unsafe { verbs_ctx(ctx) } {
        let off = std::mem::offset_of!(ffi::verbs_context, query_port);
        // SAFETY: `vctx` is the extended context of a live one; `has_op` checked that
        // the field exists in the library's struct before it is read.
        let op = unsafe { has_op(vctx, off) }
            .then(|| unsafe { (*vctx.as_ptr()).query_port })
            .flatten();
        if let Some(op) = op {
            // SAFETY: the library's own operation, called with its own context and a
            // writable struct of exactly the size passed.
            let rc = unsafe {
                op(
                    ctx.as_ptr(),
                    port,
                    attr,
                    std::mem::size_of::<ffi::ibv_port_attr>(),
                )
            };
            return (rc, true);
        }
    }
    // SAFETY: the compat symbol writes at most `sizeof(struct _compat_ibv_port_attr)`
    // (48) bytes, a prefix of the live `ibv_port_attr` we pass.
    let rc = unsafe {
        ffi::ibv_query_port(
            ctx.as_ptr(),
            port,
            (attr as *mut ffi::ibv_port_attr).cast::<ffi::_compat_ibv_port_attr>(),
        )
    };
    (rc, false)
}

/// `enum ibv_gid_type` (verbs.h; bindgen leaves it out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GidType {
    /// An InfiniBand GID.
    Ib,
    /// RoCE v1 (Ethernet, no IP header).
    RoceV1,
    /// RoCE v2 (UDP/IP): the routable kind, what an IPv4-mapped GID should use.
    RoceV2,
}

extern "C" {
    /// `_ibv_query_gid_ex@IBVERBS_1.11` (rdma-core v32 and later): what the header's
    /// `ibv_query_gid_ex` inline calls. Not in rdma-sys's bindings (its allow-list
    /// skips names starting with `_`).
    fn _ibv_query_gid_ex(
        context: *mut ffi::ibv_context,
        port_num: u32,
        gid_index: u32,
        entry: *mut ffi::ibv_gid_entry,
        flags: u32,
        entry_size: usize,
    ) -> libc::c_int;
}

/// One GID table entry with its type: `Ok(None)` for an empty entry (`ENODATA`),
/// `Err(errno)` when the library cannot say.
///
/// # Safety
///
/// `ctx` must be a live context.
pub(super) unsafe fn gid_entry(
    ctx: NonNull<ffi::ibv_context>,
    port: u8,
    index: u32,
) -> Result<Option<([u8; 16], GidType)>, i32> {
    // SAFETY: `ibv_gid_entry` is plain integers and a union of byte arrays; all-zero is
    // a valid value.
    let mut entry: ffi::ibv_gid_entry = unsafe { std::mem::zeroed() };
    // SAFETY: live context (caller); `entry` is a live, writable struct of the size we
    // pass, and the library writes at most that many bytes.
    let rc = unsafe {
        _ibv_query_gid_ex(
            ctx.as_ptr(),
            port.into(),
            index,
            &mut entry,
            0,
            std::mem::size_of::<ffi::ibv_gid_entry>(),
        )
    };
    match rc {
        0 => {}
        libc::ENODATA => return Ok(None),
        e => return Err(e),
    }
    let ty = match entry.gid_type {
        0 => GidType::Ib,
        1 => GidType::RoceV1,
        2 => GidType::RoceV2,
        _ => return Err(libc::EPROTO),
    };
    // SAFETY: every bit pattern is a valid `[u8; 16]`, so the `raw` view of the union
    // is always defined.
    Ok(Some((unsafe { entry.gid.raw }, ty)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rdma::Context;

    /// On a library that marks its contexts as rdma-core does (every real provider, and
    /// the software device), this dispatch finds the extended `query_port`, and it
    /// reports what only the full struct carries; rdma-sys 0.3's own inline takes the
    /// compat fallback there (its `abi_compat` check compares with `u32::MAX`).
    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn extended_query_port_is_found_where_rdma_sys_misses_it() {
        let name = std::env::var("PSERV_RDMA_DEVICE").expect("PSERV_RDMA_DEVICE names a device");
        let ctx = Context::open(Some(&name)).unwrap();
        let raw = NonNull::new(ctx.inner.raw()).unwrap();
        // SAFETY: `raw` is the open context `ctx` keeps alive for this whole test.
        let vctx = unsafe { verbs_ctx(raw) };
        assert!(vctx.is_some(), "abi_compat is UINTPTR_MAX");
        assert!(ctx.extended_verbs());
        let mut ours: ffi::ibv_port_attr = crate::rdma::zeroed();
        // SAFETY: as above; `ours` is a live zeroed struct.
        let (rc, extended) = unsafe { query_port(raw, 1, &mut ours) };
        assert_eq!((rc, extended), (0, true));
        let mut theirs: ffi::ibv_port_attr = crate::rdma::zeroed();
        // SAFETY: rdma-sys's inline on the same live context and a live struct.
        let rc = unsafe { ffi::___ibv_query_port(raw.as_ptr(), 1, &mut theirs) };
        assert_eq!(rc, 0);
        assert_eq!(ours.state, theirs.state);
        assert_eq!(ours.lid, theirs.lid);
        assert_eq!(ours.max_msg_sz, theirs.max_msg_sz);
        if std::env::var_os("PSERV_SOFT_RDMA").is_some() {
            // The software device sets port_cap_flags2; only the extended call sees it.
            assert_ne!(
                ours.port_cap_flags2, 0,
                "extended query fills the whole struct"
            );
            assert_eq!(
                theirs.port_cap_flags2, 0,
                "rdma-sys 0.3 took the 48-byte compat path (if this fails, rdma-sys fixed \
                 its verbs_get_ctx and ext.rs can go)"
            );
        }
    }

    #[test]
    #[ignore = "needs an RDMA device: set PSERV_RDMA_DEVICE and pass --ignored"]
    fn gid_types_come_from_the_library() {
        let name = std::env::var("PSERV_RDMA_DEVICE").expect("PSERV_RDMA_DEVICE names a device");
        let ctx = Context::open(Some(&name)).unwrap();
        let port = ctx.port(1).unwrap();
        let first = ctx.gid_with_type(1, 0).unwrap();
        let (gid, ty) = first.expect("GID 0 is set on an active port");
        assert_eq!(gid, ctx.gid(1, 0).unwrap());
        match port.link_layer {
            crate::rdma::LinkLayer::Ethernet => assert_ne!(ty, GidType::Ib),
            _ => assert_eq!(ty, GidType::Ib),
        }
        // An index past the table is an error, not a panic or a zero GID.
        assert!(ctx.gid_with_type(1, port.gid_table_len + 7).is_err());
        let idx = ctx.default_gid_index(&port);
        if port.link_layer == crate::rdma::LinkLayer::Ethernet {
            let (g, t) = ctx.gid_with_type(1, idx.into()).unwrap().unwrap();
            let any_v2_v4 = (0..port.gid_table_len).any(|i| {
                matches!(ctx.gid_with_type(1, i), Ok(Some((g, GidType::RoceV2)))
                    if g[..10] == [0; 10] && g[10..12] == [0xff, 0xff])
            });
            if any_v2_v4 {
                assert_eq!(t, GidType::RoceV2, "index {idx}");
                assert_eq!(&g[10..12], &[0xff, 0xff], "index {idx}: IPv4-mapped");
            }
        } else {
            assert_eq!(idx, 0);
        }
    }
}
