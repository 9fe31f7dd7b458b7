//! Tracing (`lb-agent trace`): the filter, the traced programs swapped into the
//! XDP link, the budget's refusals and the log stream.

use aya::{
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{links::FdLink, links::PinnedLink, xdp::XdpLink, Xdp},
};
use lb_common::map_names as names;

use super::{load_retrying, map_err, map_mut, prog_name, program, set_rare_slot, Dataplane, DataplaneError, Result};

impl Dataplane {
    /// Sets the program's trace filter (`TraceFilter::default()`: no trace, the
    /// program back to one array read and a branch per packet).
    pub fn set_trace_filter(&mut self, filter: lb_common::TraceFilter) -> Result<()> {
        let name = names::TRACE_FILTER;
        let mut m: Array<_, lb_common::TraceFilter> = Array::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?;
        m.set(0, filter, 0).map_err(map_err(name))
    }

    /// Puts the balancer with the trace hook (`on`) or without it into the XDP
    /// link, atomically (`bpf_link_update`): tracing costs nothing while off.
    pub fn set_tracing(&mut self, on: bool) -> Result<()> {
        let name = if on { lb_common::PROG_BALANCER_TRACE } else { lb_common::PROG_BALANCER };
        let link_err = |error: String| DataplaneError::Link { path: "XDP link".into(), error };
        if on {
            // Its rare path first, so that no traced ICMP error finds the slot empty.
            let rare: &mut Xdp = program(&mut self.ebpf, lb_common::PROG_RARE_TRACE)?;
            if rare.fd().is_err() {
                load_retrying(rare)
                    .map_err(|source| DataplaneError::Program { name: lb_common::PROG_RARE_TRACE, source })?;
                set_rare_slot(&mut self.ebpf, lb_common::PROG_RARE_TRACE, lb_common::RARE_TRACE_SLOT)?;
            }
        }
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        if prog.fd().is_err() {
            load_retrying(prog).map_err(|source| DataplaneError::Program { name: prog_name(name), source })?;
        }
        let link = self.link.take().ok_or_else(|| link_err("the balancer is not attached".into()))?;
        let link = XdpLink::try_from(link).map_err(|e| link_err(e.to_string()))?;
        let prog_err = |source| DataplaneError::Program { name: prog_name(name), source };
        let prog: &mut Xdp = program(&mut self.ebpf, name)?;
        let swapped = prog.attach_to_link(link).and_then(|id| prog.take_link(id)).map_err(prog_err);
        match swapped {
            Ok(link) => {
                self.link = Some(FdLink::try_from(link).map_err(|e| link_err(e.to_string()))?);
                Ok(())
            }
            Err(e) => {
                // The link itself stays in the kernel (pinned); take our handle back.
                if let Some(pins) = &self.pins {
                    self.link = PinnedLink::from_pin(pins.link()).ok().map(FdLink::from);
                }
                Err(e)
            }
        }
    }

    /// Trace records the per-second budget refused, summed over CPUs; `reset`
    /// zeroes the counts (at the start of a trace).
    pub fn trace_dropped(&mut self, reset: bool) -> Result<u64> {
        let name = names::TRACE_BUDGET;
        let mut m: PerCpuArray<_, lb_common::TraceBudget> =
            PerCpuArray::try_from(map_mut(&mut self.ebpf, name)?).map_err(map_err(name))?;
        let values = m.get(&0, 0).map_err(map_err(name))?;
        let dropped = values.iter().map(|b| b.dropped).sum();
        if reset {
            let zero = PerCpuValues::try_from(vec![lb_common::TraceBudget::default(); values.len()])
                .map_err(|source| DataplaneError::PinDir { path: "TRACE_BUDGET (per-CPU values)".into(), source })?;
            m.set(0, zero, 0).map_err(map_err(name))?;
        }
        Ok(dropped)
    }

    /// Starts reading the program's aya-log records into `sink` (once per load).
    pub fn trace_logger(&mut self, sink: crate::trace::Sink) -> std::result::Result<aya_log::EbpfLogger<crate::trace::Sink>, aya_log::Error> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, sink)
    }
}
