//! Finding, loading and wiring the object's XDP programs.

use aya::{programs::Xdp, Ebpf};

use super::{map_err, map_mut, Dataplane, DataplaneError, Result};
use crate::plan::Plan;

/// Loads a program, again when the verifier gave up with EAGAIN: it stops when a
/// signal is pending, and the agent's probes (exec children: SIGCHLD) and its
/// runtime's signal handling can make that happen during a long verification.
pub(super) fn load_retrying(prog: &mut Xdp) -> std::result::Result<(), aya::programs::ProgramError> {
    let mut tries = 0;
    loop {
        match prog.load() {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && tries < 5 =>
            {
                tries += 1;
                tracing::debug!(tries, "the verifier was interrupted by a signal: loading again");
            }
            other => return other,
        }
    }
}

/// Loads the programs `names`, each in a thread of its own: the verifier takes
/// most of the start-up time, and verifies different programs in parallel.
pub(super) fn load_all(ebpf: &mut Ebpf, names: &[&str]) -> Result<()> {
    let mut progs = Vec::new();
    for (name, prog) in ebpf.programs_mut() {
        if let Some(&wanted) = names.iter().find(|n| **n == name) {
            let prog: &mut Xdp = prog.try_into().map_err(|_| DataplaneError::Program {
                name: prog_name(wanted),
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?;
            progs.push((wanted, prog));
        }
    }
    if let Some(missing) = names.iter().find(|n| !progs.iter().any(|(p, _)| p == *n)) {
        return Err(DataplaneError::Program {
            name: prog_name(missing),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        });
    }
    // At start, lb_xdp's verification is longer than lb_rare's and lb_pass's,
    // which (with the agent's parse and plan meanwhile) fit beside it: they yield
    // the CPU to it. lb_prefix and lb_nat take longer than lb_xdp: not these.
    let balancer = names.contains(&lb_common::PROG_BALANCER);
    let loaded: Vec<std::result::Result<(), (&str, aya::programs::ProgramError)>> = std::thread::scope(|s| {
        let threads: Vec<_> = progs
            .into_iter()
            .map(|(name, prog)| {
                s.spawn(move || {
                    if balancer && matches!(name, lb_common::PROG_RARE | lb_common::PROG_PASS) {
                        // SAFETY: setpriority(2) on this thread only; a failure leaves the priority as it was.
                        unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                    }
                    load_retrying(prog).map_err(|e| (name, e))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("a program load does not panic")).collect()
    });
    for r in loaded {
        r.map_err(|(name, source)| DataplaneError::Program { name: prog_name(name), source })?;
    }
    Ok(())
}

/// Puts loaded program `name` at `slot` of `RARE_PROGS`.
pub(super) fn set_rare_slot(ebpf: &mut Ebpf, name: &'static str, slot: u32) -> Result<()> {
    let err = |source| DataplaneError::Program { name, source };
    let fd = program(ebpf, name)?
        .fd()
        .map_err(err)?
        .try_clone()
        .map_err(|e| DataplaneError::PinDir { path: format!("{name} (program fd)").into(), source: e })?;
    let mut rare: aya::maps::ProgramArray<_> =
        aya::maps::ProgramArray::try_from(map_mut(ebpf, lb_common::map_names::RARE_PROGS)?)
            .map_err(map_err(lb_common::map_names::RARE_PROGS))?;
    rare.set(slot, &fd, 0).map_err(map_err(lb_common::map_names::RARE_PROGS))
}

pub(super) fn prog_name(name: &str) -> &'static str {
    match name {
        lb_common::PROG_RARE_TRACE => lb_common::PROG_RARE_TRACE,
        lb_common::PROG_PASS => lb_common::PROG_PASS,
        lb_common::PROG_BALANCER_TRACE => lb_common::PROG_BALANCER_TRACE,
        lb_common::PROG_RARE => lb_common::PROG_RARE,
        lb_common::PROG_PREFIX => lb_common::PROG_PREFIX,
        lb_common::PROG_NAT => lb_common::PROG_NAT,
        lb_common::PROG_NAT_REPLY => lb_common::PROG_NAT_REPLY,
        _ => lb_common::PROG_BALANCER,
    }
}

pub(super) fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut Xdp> {
    let missing = || DataplaneError::Program {
        name: prog_name(name),
        source: aya::programs::ProgramError::UnexpectedProgramType,
    };
    let prog = ebpf.program_mut(name).ok_or_else(missing)?;
    prog.try_into().map_err(|_| missing())
}

impl Dataplane {
    /// Loads `lb_prefix` into `RARE_PROGS` the first time a plan has prefix
    /// services, and `lb_nat` and `lb_nat_reply` the first time it has `nat` or
    /// `fullnat` services (before the maps and `CONFIG` send frames there): the
    /// verifier's time for them (`lb_nat`'s SNAT probe loop is most of a second)
    /// is spent only by configurations that use them.
    pub(super) fn load_on_demand(&mut self, plan: &Plan) -> Result<()> {
        if !self.prefix_loaded && plan.has_prefix() {
            let name = lb_common::PROG_PREFIX;
            let prog: &mut Xdp = program(&mut self.ebpf, name)?;
            load_retrying(prog).map_err(|source| DataplaneError::Program { name: prog_name(name), source })?;
            set_on_demand_slots(&mut self.ebpf, true, false)?;
            self.prefix_loaded = true;
        }
        if !self.nat_loaded && (plan.nat || plan.fullnat) {
            // Refused before lb_nat's verification when the NAT tables are unsized.
            crate::apply::check_fits(self, plan)?;
            load_all(&mut self.ebpf, &[lb_common::PROG_NAT, lb_common::PROG_NAT_REPLY])?;
            set_on_demand_slots(&mut self.ebpf, false, true)?;
            self.nat_loaded = true;
        }
        Ok(())
    }
}

/// Puts the loaded `lb_prefix` (`prefix`) and `lb_nat` and `lb_nat_reply`
/// (`nat`) in their `RARE_PROGS` slots. lb_xdp (and lb_rare, for ICMP errors)
/// tail-call lb_nat with a `nat`/`fullnat` backend's packet, and frames to no VIP
/// go to lb_nat_reply while CONFIG_NAT or CONFIG_FULLNAT is set.
pub(super) fn set_on_demand_slots(ebpf: &mut Ebpf, prefix: bool, nat: bool) -> Result<()> {
    if prefix {
        set_rare_slot(ebpf, lb_common::PROG_PREFIX, lb_common::PREFIX_SLOT)?;
    }
    if nat {
        set_rare_slot(ebpf, lb_common::PROG_NAT, lb_common::NAT_SLOT)?;
        set_rare_slot(ebpf, lb_common::PROG_NAT_REPLY, lb_common::NAT_REPLY_SLOT)?;
    }
    Ok(())
}
