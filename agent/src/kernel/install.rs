//! Attaching one program: as a link this process owns (detached when it exits), as a new pinned
//! link, or into the pinned link of a previous agent of the same layout, whose program is swapped
//! in place (`BPF_LINK_UPDATE`), so interception never stops across a restart.

use std::{fs::File, os::fd::AsFd as _, path::Path};

use anyhow::Context as _;
use aya::programs::{
    CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramFd, SkLookup, SockOps, links::FdLink,
};

use super::{
    Attachment, bpf_sys,
    diagnose::{AttachSite, explain},
    pins::PinDir,
};

/// A program aya can attach to a file (a cgroup, a network namespace) and hand its link over.
pub trait Attachable {
    type LinkId;
    type Link;
    fn attach_to(&mut self, target: &File) -> Result<Self::LinkId, ProgramError>;
    fn take(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError>;
    fn program_fd(&self) -> Result<&ProgramFd, ProgramError>;
}

macro_rules! cgroup_program {
    ($ty:ty, $id:ty, $link:ty) => {
        impl Attachable for $ty {
            type LinkId = $id;
            type Link = $link;
            fn attach_to(&mut self, cgroup: &File) -> Result<$id, ProgramError> {
                // Single is right for links on kernels >= 5.7: they coexist with other programs.
                self.attach(cgroup, CgroupAttachMode::Single)
            }
            fn take(&mut self, id: $id) -> Result<$link, ProgramError> {
                self.take_link(id)
            }
            fn program_fd(&self) -> Result<&ProgramFd, ProgramError> {
                self.fd()
            }
        }
    };
}

cgroup_program!(
    CgroupSockAddr,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLinkId,
    aya::programs::cgroup_sock_addr::CgroupSockAddrLink
);
cgroup_program!(
    SockOps,
    aya::programs::sock_ops::SockOpsLinkId,
    aya::programs::sock_ops::SockOpsLink
);

impl Attachable for SkLookup {
    type LinkId = aya::programs::sk_lookup::SkLookupLinkId;
    type Link = aya::programs::sk_lookup::SkLookupLink;
    fn attach_to(&mut self, netns: &File) -> Result<Self::LinkId, ProgramError> {
        self.attach(netns)
    }
    fn take(&mut self, id: Self::LinkId) -> Result<Self::Link, ProgramError> {
        self.take_link(id)
    }
    fn program_fd(&self) -> Result<&ProgramFd, ProgramError> {
        self.fd()
    }
}

/// Where a program attaches: the file, its path (for messages), and whether it is a cgroup
/// (whose refusals the diagnosis can trace to a program in the way).
pub struct Target<'a> {
    pub file: &'a File,
    pub path: &'a Path,
    pub cgroup: bool,
}

/// Attaches `prog` at `target`: owned by the program without a pin directory; otherwise into the
/// pinned link of a previous agent (swapping programs in place) or as a new pinned link.
pub fn install<P>(
    prog: &mut P,
    name: &str,
    target: &Target<'_>,
    pins: Option<&PinDir>,
) -> anyhow::Result<Attachment>
where
    P: Attachable,
    FdLink: TryFrom<P::Link>,
    <FdLink as TryFrom<P::Link>>::Error: std::error::Error + Send + Sync + 'static,
{
    let attach_err = |e: ProgramError| {
        let site = target.cgroup.then_some(AttachSite {
            cgroup: target.path,
            program: name,
        });
        let context = format!("attaching {name} to {}", target.path.display());
        explain(anyhow::Error::new(e).context(context), site)
    };
    let Some(pins) = pins else {
        prog.attach_to(target.file).map_err(attach_err)?;
        return Ok(Attachment::Owned);
    };
    let path = pins.link(name);
    if path.exists() {
        let link = bpf_sys::obj_get(&path)
            .with_context(|| format!("opening pinned link {}", path.display()))?;
        let prog_fd = prog.program_fd()?;
        bpf_sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| {
            let context = format!("swapping {name} into pinned link {}", path.display());
            explain(anyhow::Error::new(e).context(context), None)
        })?;
        return Ok(Attachment::TakenOver);
    }
    let id = prog.attach_to(target.file).map_err(attach_err)?;
    let link = FdLink::try_from(prog.take(id)?).map_err(|e| {
        anyhow::anyhow!("{name}: link is not a bpf link ({e}); pinning needs Linux >= 5.7")
    })?;
    link.pin(&path)
        .map_err(|e| anyhow::anyhow!("pinning {name} at {}: {e}", path.display()))?;
    Ok(Attachment::Pinned)
}
