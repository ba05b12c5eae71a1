//! Device discovery, device contexts and protection domains.

use std::ffi::CStr;
use std::fmt;
use std::ptr::NonNull;
use std::sync::Arc;

use rdma_sys as ffi;

use super::ext::{self, GidType};
use super::{last_errno, returned_errno, zeroed, LinkLayer, Mtu, RdmaError, Result};

/// `IBV_LINK_LAYER_INFINIBAND` (an anonymous enum in verbs.h that bindgen skips).
const LINK_LAYER_INFINIBAND: u8 = 1;
/// `IBV_LINK_LAYER_ETHERNET`.
const LINK_LAYER_ETHERNET: u8 = 2;
/// GID tables are small (RoCE: a few entries per netdev address); never scan more.
const GID_SCAN_MAX: u32 = 256;

/// The list `ibv_get_device_list` returns, freed on drop.
///
/// Contexts opened from it stay valid after it is freed (libibverbs keeps the opened
/// devices referenced), which is what lets [`Context`] outlive it.
struct DeviceList {
    /// `None` when libibverbs reported "no devices" by returning no list at all.
    list: Option<NonNull<*mut ffi::ibv_device>>,
    len: usize,
}

impl DeviceList {
    fn new() -> Result<DeviceList> {
        let mut n: libc::c_int = 0;
        // SAFETY: `n` is a live local the call writes the count into; the returned array
        // is owned by this `DeviceList` and freed exactly once in `Drop`.
        let ptr = unsafe { ffi::ibv_get_device_list(&mut n) };
        let Some(list) = NonNull::new(ptr) else {
            let err = std::io::Error::last_os_error();
            return match err.raw_os_error() {
                // ENOSYS: no InfiniBand / RDMA support in the kernel (no
                // /sys/class/infiniband_verbs); the others are what some rdma-core
                // versions report for a missing sysfs class. All mean "no device".
                Some(libc::ENOSYS | libc::ENODEV | libc::ENOENT) | Some(0) | None => {
                    Ok(DeviceList { list: None, len: 0 })
                }
                _ => Err(RdmaError::DeviceList(err)),
            };
        };
        Ok(DeviceList {
            list: Some(list),
            len: usize::try_from(n).unwrap_or(0),
        })
    }

    fn devices(&self) -> &[*mut ffi::ibv_device] {
        match self.list {
            None => &[],
            // SAFETY: libibverbs returned an array of `n` device pointers (plus a NULL
            // terminator) that stays valid until `ibv_free_device_list`, which only runs
            // in our `Drop`, after every borrow of `self` has ended.
            Some(list) => unsafe { std::slice::from_raw_parts(list.as_ptr(), self.len) },
        }
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        if let Some(list) = self.list {
            // SAFETY: the array came from `ibv_get_device_list` and is freed only here.
            unsafe { ffi::ibv_free_device_list(list.as_ptr()) };
        }
    }
}

fn device_name(dev: *mut ffi::ibv_device) -> String {
    // SAFETY: `dev` is an element of a live device list; the name points into the device
    // struct, which lives as long as the list, and we copy it out before returning.
    let name = unsafe { ffi::ibv_get_device_name(dev) };
    if name.is_null() {
        return String::from("?");
    }
    // SAFETY: non-null, NUL-terminated (a fixed 64-byte array in `struct ibv_device`).
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

fn device_guid(dev: *mut ffi::ibv_device) -> u64 {
    // SAFETY: `dev` is an element of a live device list; the call only reads sysfs.
    let raw = unsafe { ffi::ibv_get_device_guid(dev) };
    u64::from_be(raw)
}

/// What [`devices`] reports about one RDMA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Kernel name of the device (`mlx5_0`, `rxe0`, ...).
    pub name: String,
    /// Node GUID in host order (0 when the device does not report one).
    pub guid: u64,
    /// Its ports; empty when the device could not be opened (the reason is logged).
    pub ports: Vec<PortInfo>,
    /// The firmware version it reports (`ibv_query_device`'s `fw_ver`; empty when the
    /// device could not be opened). The software device of `sys/softrdma` says
    /// `softrdma ...`.
    pub firmware: String,
}

impl DeviceInfo {
    /// The GUID written as `ibv_devices` does (`0002:c903:0010:1234`).
    pub fn guid_string(&self) -> String {
        let g = self.guid;
        format!(
            "{:04x}:{:04x}:{:04x}:{:04x}",
            (g >> 48) & 0xffff,
            (g >> 32) & 0xffff,
            (g >> 16) & 0xffff,
            g & 0xffff
        )
    }
}

/// State and addressing of one port of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortInfo {
    /// Port number (ports count from 1).
    pub port: u8,
    /// Whether the port is ACTIVE (or ARMED), i.e. usable for queue pairs.
    pub active: bool,
    /// The state as `ibv_port_state_str` names it (`PORT_ACTIVE`, `PORT_DOWN`, ...).
    pub state: String,
    /// InfiniBand or Ethernet (RoCE).
    pub link_layer: LinkLayer,
    /// Local identifier (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// The MTU currently in effect (`None` for a code this crate does not know).
    pub active_mtu: Option<Mtu>,
    /// Number of entries in the GID table.
    pub gid_table_len: u32,
    /// Largest message the port carries, in bytes (1 GiB or 2 GiB on InfiniBand HCAs,
    /// 8 MiB on Soft-RoCE): longer transfers must be split.
    pub max_msg_size: u32,
    /// `port_cap_flags2`: only the extended port query (with the struct's full size)
    /// reports it; the exported compat `ibv_query_port` leaves it 0.
    pub cap_flags2: u16,
}

/// Limits of a device that bound what pserv may ask of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceLimits {
    /// Most work requests per send or receive queue.
    pub max_qp_wr: u32,
    /// Most entries per completion queue.
    pub max_cqe: u32,
    /// Most outstanding RDMA READs a queue pair may issue (initiator depth).
    pub max_qp_init_rd_atom: u8,
    /// Most outstanding RDMA READs a queue pair may serve (responder depth).
    pub max_qp_rd_atom: u8,
    /// Largest memory region in bytes.
    pub max_mr_size: u64,
    /// Number of physical ports.
    pub phys_port_cnt: u8,
}

/// Whether a device's firmware string is that of the software device of
/// `sys/softrdma`.
pub fn is_software_firmware(firmware: &str) -> bool {
    firmware.starts_with("softrdma")
}

/// List the RDMA devices of this machine with their ports.
///
/// A machine without RDMA devices, including one whose kernel has no RDMA support at all
/// (`ibv_get_device_list` fails with `ENOSYS`), gives `Ok(vec![])`. Errors are kept for
/// real failures (for example `EPERM`).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let list = DeviceList::new()?;
    let mut out = Vec::with_capacity(list.devices().len());
    for &dev in list.devices() {
        let name = device_name(dev);
        let guid = device_guid(dev);
        let opened = ContextInner::open(dev, name.clone())
            .and_then(|c| c.ports().map(|p| (p, c.firmware.clone())));
        let (ports, firmware) = match opened {
            Ok(found) => found,
            Err(err) => {
                tracing::warn!(device = %name, error = %err, "cannot open RDMA device to list its ports");
                (Vec::new(), String::new())
            }
        };
        out.push(DeviceInfo {
            name,
            guid,
            ports,
            firmware,
        });
    }
    Ok(out)
}

pub(super) struct ContextInner {
    ctx: NonNull<ffi::ibv_context>,
    name: String,
    limits: DeviceLimits,
    firmware: String,
}

// SAFETY: libibverbs is thread safe: every verb on a context (and on the objects created
// from it) may be called from any thread concurrently. We never write through the pointer
// ourselves; it is only passed to verbs.
unsafe impl Send for ContextInner {}
// SAFETY: as for `Send`.
unsafe impl Sync for ContextInner {}

impl ContextInner {
    fn open(dev: *mut ffi::ibv_device, name: String) -> Result<ContextInner> {
        // SAFETY: `dev` is an element of a live device list; the returned context is
        // owned by the `ContextInner` and closed exactly once in its `Drop`.
        let ctx = unsafe { ffi::ibv_open_device(dev) };
        let Some(ctx) = NonNull::new(ctx) else {
            return Err(last_errno("ibv_open_device", &name));
        };
        let mut inner = ContextInner {
            ctx,
            name,
            firmware: String::new(),
            limits: DeviceLimits {
                max_qp_wr: 0,
                max_cqe: 0,
                max_qp_init_rd_atom: 0,
                max_qp_rd_atom: 0,
                max_mr_size: 0,
                phys_port_cnt: 0,
            },
        };
        let mut attr: ffi::ibv_device_attr = zeroed();
        // SAFETY: the context is open; `attr` is a live, writable struct of the size the
        // library expects (same bindings, same header).
        let rc = unsafe { ffi::ibv_query_device(inner.ctx.as_ptr(), &mut attr) };
        if rc != 0 {
            return Err(returned_errno("ibv_query_device", &inner.name, rc));
        }
        let clamp_u8 = |v: libc::c_int| u8::try_from(v.max(0)).unwrap_or(u8::MAX);
        // `fw_ver` is a NUL-terminated C string in a fixed array.
        let fw: Vec<u8> = attr
            .fw_ver
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        inner.firmware = String::from_utf8_lossy(&fw).into_owned();
        inner.limits = DeviceLimits {
            max_qp_wr: u32::try_from(attr.max_qp_wr).unwrap_or(0),
            max_cqe: u32::try_from(attr.max_cqe).unwrap_or(0),
            max_qp_init_rd_atom: clamp_u8(attr.max_qp_init_rd_atom),
            max_qp_rd_atom: clamp_u8(attr.max_qp_rd_atom),
            max_mr_size: attr.max_mr_size,
            phys_port_cnt: attr.phys_port_cnt,
        };
        Ok(inner)
    }

    pub(super) fn raw(&self) -> *mut ffi::ibv_context {
        self.ctx.as_ptr()
    }

    fn port(&self, port: u8) -> Result<PortInfo> {
        let mut attr: ffi::ibv_port_attr = zeroed();
        // SAFETY: the context is open and `attr` is a live, zeroed `ibv_port_attr` of
        // the layout the library's header declares. Not rdma-sys's `___ibv_query_port`:
        // its extended-context check is wrong (see `ext`).
        let (rc, _) = unsafe { ext::query_port(self.ctx, port, &mut attr) };
        if rc != 0 {
            return Err(returned_errno("ibv_query_port", &self.name, rc));
        }
        let active = matches!(
            attr.state,
            ffi::ibv_port_state::IBV_PORT_ACTIVE | ffi::ibv_port_state::IBV_PORT_ARMED
        );
        // SAFETY: `ibv_port_state_str` returns a pointer to a static string (or
        // "unknown") for any value.
        let state = unsafe { CStr::from_ptr(ffi::ibv_port_state_str(attr.state)) }
            .to_string_lossy()
            .into_owned();
        Ok(PortInfo {
            port,
            active,
            state,
            link_layer: match attr.link_layer {
                LINK_LAYER_INFINIBAND => LinkLayer::InfiniBand,
                LINK_LAYER_ETHERNET => LinkLayer::Ethernet,
                _ => LinkLayer::Unspecified,
            },
            lid: attr.lid,
            active_mtu: Mtu::from_code(attr.active_mtu),
            gid_table_len: u32::try_from(attr.gid_tbl_len).unwrap_or(0),
            max_msg_size: attr.max_msg_sz,
            cap_flags2: attr.port_cap_flags2,
        })
    }

    fn ports(&self) -> Result<Vec<PortInfo>> {
        (1..=self.limits.phys_port_cnt)
            .map(|p| self.port(p))
            .collect()
    }

    fn gid(&self, port: u8, index: u32) -> Result<[u8; 16]> {
        let mut gid: ffi::ibv_gid = zeroed();
        let index_c = libc::c_int::try_from(index)
            .map_err(|_| RdmaError::Config(format!("gid index {index} out of range")))?;
        // SAFETY: the context is open and `gid` is a live, writable `union ibv_gid`.
        let rc = unsafe { ffi::ibv_query_gid(self.ctx.as_ptr(), port, index_c, &mut gid) };
        if rc != 0 {
            return Err(returned_errno("ibv_query_gid", &self.name, rc));
        }
        // SAFETY: every bit pattern is a valid `[u8; 16]`, so reading the `raw` view of
        // the union is always defined.
        Ok(unsafe { gid.raw })
    }

    /// Whether the library gave this context the extended verbs (rdma-core's
    /// `verbs_context`, marked by `abi_compat == UINTPTR_MAX`).
    fn extended(&self) -> bool {
        // SAFETY: the context is open.
        unsafe { ext::verbs_ctx(self.ctx) }.is_some()
    }

    /// GID `index` of `port` with its type, asked of the library
    /// (`ibv_query_gid_ex`); `None` for an empty entry.
    fn gid_with_type(&self, port: u8, index: u32) -> Result<Option<([u8; 16], GidType)>> {
        // SAFETY: the context is open.
        unsafe { ext::gid_entry(self.ctx, port, index) }
            .map_err(|e| returned_errno("ibv_query_gid_ex", &self.name, e))
    }

    /// Whether GID `index` of `port` is a RoCE v2 GID: asked of the library, else (an
    /// old library) read from sysfs; `None`: unknown.
    fn gid_is_roce_v2(&self, port: u8, index: u32) -> Option<bool> {
        if let Ok(entry) = self.gid_with_type(port, index) {
            return entry.map(|(_, t)| t == GidType::RoceV2);
        }
        let path = format!(
            "/sys/class/infiniband/{}/ports/{port}/gid_attrs/types/{index}",
            self.name
        );
        let text = std::fs::read_to_string(path).ok()?;
        Some(text.trim().eq_ignore_ascii_case("RoCE v2"))
    }

    /// The GID index a queue pair on `port` should use by default: on InfiniBand 0; on
    /// Ethernet the first RoCE v2 GID holding an IPv4-mapped address, else the first
    /// RoCE v2 GID, else the first non-zero GID, else 0.
    fn default_gid_index(&self, port: &PortInfo) -> u8 {
        if port.link_layer != LinkLayer::Ethernet {
            return 0;
        }
        let mut first_v2 = None;
        let mut first_nonzero = None;
        for index in 0..port.gid_table_len.min(GID_SCAN_MAX) {
            let Ok(gid) = self.gid(port.port, index) else {
                continue;
            };
            if gid == [0; 16] {
                continue;
            }
            first_nonzero.get_or_insert(index);
            if self.gid_is_roce_v2(port.port, index) == Some(true) {
                let ipv4_mapped = gid[..10] == [0; 10] && gid[10..12] == [0xff, 0xff];
                if ipv4_mapped {
                    return u8::try_from(index).unwrap_or(0);
                }
                first_v2.get_or_insert(index);
            }
        }
        first_v2
            .or(first_nonzero)
            .and_then(|i| u8::try_from(i).ok())
            .unwrap_or(0)
    }
}

impl Drop for ContextInner {
    fn drop(&mut self) {
        // SAFETY: every child object holds an `Arc` of this context, so none is left; the
        // context is closed exactly once.
        let rc = unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.name, rc, "ibv_close_device failed");
        }
    }
}

/// An open RDMA device. Cheap to clone (an `Arc`); closed when the last clone and the
/// last object created from it are gone.
#[derive(Clone)]
pub struct Context {
    pub(super) inner: Arc<ContextInner>,
}

impl fmt::Debug for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Context")
            .field("device", &self.inner.name)
            .field("limits", &self.inner.limits)
            .finish()
    }
}

impl Context {
    /// Open the device named `name`, or the first device when `name` is `None`.
    ///
    /// Fails with [`RdmaError::NoDevice`] on a machine without RDMA devices and with
    /// [`RdmaError::DeviceNotFound`] when `name` is not among them.
    pub fn open(name: Option<&str>) -> Result<Context> {
        let list = DeviceList::new()?;
        let devs = list.devices();
        if devs.is_empty() {
            return Err(RdmaError::NoDevice);
        }
        let chosen = match name {
            None => devs[0],
            Some(want) => match devs.iter().find(|&&d| device_name(d) == want) {
                Some(&d) => d,
                None => {
                    return Err(RdmaError::DeviceNotFound {
                        name: want.to_owned(),
                        available: devs.iter().map(|&d| device_name(d)).collect(),
                    })
                }
            },
        };
        let inner = ContextInner::open(chosen, device_name(chosen))?;
        Ok(Context {
            inner: Arc::new(inner),
        })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The device's limits (queried once at open).
    pub fn limits(&self) -> DeviceLimits {
        self.inner.limits
    }

    /// The firmware version the device reports (`fw_ver`).
    pub fn firmware(&self) -> &str {
        &self.inner.firmware
    }

    /// Whether this is the software device of `sys/softrdma` (a replacement libibverbs
    /// on `LD_LIBRARY_PATH`), whose figures say nothing about RDMA hardware.
    pub fn is_software_device(&self) -> bool {
        is_software_firmware(&self.inner.firmware)
    }

    /// Query one port (ports count from 1). Port state changes over time, so this asks
    /// the device every time.
    pub fn port(&self, port: u8) -> Result<PortInfo> {
        self.inner.port(port)
    }

    /// Query all ports.
    pub fn ports(&self) -> Result<Vec<PortInfo>> {
        self.inner.ports()
    }

    /// GID `index` of `port` (16 bytes, network order).
    pub fn gid(&self, port: u8, index: u32) -> Result<[u8; 16]> {
        self.inner.gid(port, index)
    }

    /// GID `index` of `port` with its type (`ibv_query_gid_ex`); `None` for an empty
    /// entry.
    pub fn gid_with_type(&self, port: u8, index: u32) -> Result<Option<([u8; 16], GidType)>> {
        self.inner.gid_with_type(port, index)
    }

    /// Whether the library gave this context rdma-core's extended verbs (a
    /// `verbs_context`, `abi_compat == UINTPTR_MAX`). True for every rdma-core provider
    /// and the software device; pserv dispatches extended verbs itself, correctly (see
    /// the `ext` module: rdma-sys 0.3 gets this check wrong).
    pub fn extended_verbs(&self) -> bool {
        self.inner.extended()
    }

    /// The GID index queue pairs on `port` use unless configured otherwise (see
    /// [`QpConfig::gid_index`](super::QpConfig::gid_index)).
    pub fn default_gid_index(&self, port: &PortInfo) -> u8 {
        self.inner.default_gid_index(port)
    }

    /// Allocate a protection domain.
    pub fn alloc_pd(&self) -> Result<ProtectionDomain> {
        // SAFETY: the context is open (we hold it); the PD is owned by `PdInner`, which
        // keeps this context alive and deallocates the PD exactly once in `Drop`.
        let pd = unsafe { ffi::ibv_alloc_pd(self.inner.raw()) };
        let Some(pd) = NonNull::new(pd) else {
            return Err(last_errno("ibv_alloc_pd", self.name()));
        };
        Ok(ProtectionDomain {
            inner: Arc::new(PdInner {
                pd,
                ctx: self.clone(),
            }),
        })
    }
}

pub(super) struct PdInner {
    pd: NonNull<ffi::ibv_pd>,
    pub(super) ctx: Context,
}

// SAFETY: a PD is only ever passed to thread-safe verbs (see `ContextInner`).
unsafe impl Send for PdInner {}
// SAFETY: as for `Send`.
unsafe impl Sync for PdInner {}

impl Drop for PdInner {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an `Arc` of this PD, so none is
        // left; the PD is deallocated exactly once, before `ctx` (a field) is dropped.
        let rc = unsafe { ffi::ibv_dealloc_pd(self.pd.as_ptr()) };
        if rc != 0 {
            tracing::error!(device = %self.ctx.name(), rc, "ibv_dealloc_pd failed");
        }
    }
}

/// A protection domain: memory regions and queue pairs of one PD can work together.
/// Cheap to clone; keeps its [`Context`] open.
#[derive(Clone)]
pub struct ProtectionDomain {
    pub(super) inner: Arc<PdInner>,
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtectionDomain")
            .field("device", &self.inner.ctx.name())
            .finish()
    }
}

impl ProtectionDomain {
    /// The context the PD belongs to.
    pub fn context(&self) -> &Context {
        &self.inner.ctx
    }

    pub(super) fn raw(&self) -> *mut ffi::ibv_pd {
        self.inner.pd.as_ptr()
    }

    /// Whether `self` and `other` are the same protection domain.
    pub fn same_as(&self, other: &ProtectionDomain) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
