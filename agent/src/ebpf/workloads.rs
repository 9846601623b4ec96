//! Enrolling workloads: the pods whose connects the kernel steers to the
//! agent, each in a slot of the enrollment map keyed by its network
//! namespace cookie, with per-slot counters.

use std::path::{Path, PathBuf};

use aya::maps::PerCpuValues;
use wisp_common::{MAX_WORKLOADS, Workload, WorkloadCounters, addr_to_words, maps};

use super::{Dataplane, EbpfError, EnrolledWorkload, current_netns_cookie, netns_cookie, steering};

impl Dataplane {
    /// Steers the TCP connects of the pod whose network namespace is `netns`
    /// to the agent, from the next connect on.
    pub fn enroll(&mut self, name: &str, netns: &Path) -> Result<EnrolledWorkload, EbpfError> {
        let netns_err = |source| EbpfError::Netns {
            path: netns.to_owned(),
            source,
        };
        let cookie = netns_cookie(netns).map_err(netns_err)?;
        if cookie == current_netns_cookie().map_err(netns_err)? {
            return Err(EbpfError::OwnNamespace {
                name: name.to_owned(),
                path: netns.to_owned(),
            });
        }
        // The lowest free slot: workloads come and go in Kubernetes mode.
        let slot = (0..MAX_WORKLOADS)
            .find(|slot| !self.workloads.iter().any(|w| w.slot == *slot))
            .ok_or(EbpfError::TooManyWorkloads)?;
        let previous = self.enrolled_map.get(&cookie, 0).ok();
        if previous.map(|w| w.slot) != Some(slot) {
            // A slot that counted another pod before a restart starts at zero.
            self.zero_counters(slot);
        }
        self.enrolled_map
            .insert(cookie, Workload { slot, flags: 0 }, 0)
            .map_err(|source| EbpfError::Map {
                name: maps::ENROLLED,
                source,
            })?;
        self.stale.remove(&cookie);
        let workload = EnrolledWorkload {
            name: name.to_owned(),
            netns: netns.to_owned(),
            netns_cookie: cookie,
            slot,
        };
        if self.socket_steering {
            // The agent's upstream sockets to these addresses are steered.
            let addrs = steering::pod_addresses(netns).map_err(netns_err)?;
            for addr in &addrs {
                self.pod_addrs
                    .insert(addr_to_words(*addr), slot, 0)
                    .map_err(|source| EbpfError::Map {
                        name: maps::POD_ADDRS,
                        source,
                    })?;
            }
        }
        tracing::info!(workload = name, netns = %netns.display(), cookie, slot, "enrolled");
        self.workloads.push(workload.clone());
        Ok(workload)
    }

    /// Stops steering the connects of workload `name`; false when it was
    /// not enrolled. Its slot is free for the next enrollment.
    pub fn unenroll(&mut self, name: &str) -> bool {
        let Some(index) = self.workloads.iter().position(|w| w.name == name) else {
            return false;
        };
        let workload = self.workloads.remove(index);
        let _ = self.enrolled_map.remove(&workload.netns_cookie);
        tracing::info!(
            workload = name,
            cookie = workload.netns_cookie,
            slot = workload.slot,
            "unenrolled"
        );
        true
    }

    /// Makes the enrolled set exactly `wanted` (name, netns): enrolls new
    /// workloads, re-enrolls those whose namespace changed (a pod recreated
    /// under the same name), unenrolls the rest. A workload that cannot be
    /// enrolled does not stop the others; the failures are returned.
    pub fn sync_workloads(&mut self, wanted: &[(String, PathBuf)]) -> Vec<(String, EbpfError)> {
        let gone: Vec<String> = self
            .workloads
            .iter()
            .filter(|w| {
                !wanted.iter().any(|(name, netns)| {
                    *name == w.name && netns_cookie(netns).ok() == Some(w.netns_cookie)
                })
            })
            .map(|w| w.name.clone())
            .collect();
        for name in gone {
            self.unenroll(&name);
        }
        let mut failures = Vec::new();
        for (name, netns) in wanted {
            if self.workloads.iter().any(|w| w.name == *name) {
                continue;
            }
            if let Err(error) = self.enroll(name, netns) {
                failures.push((name.clone(), error));
            }
        }
        failures
    }

    /// The enrolled workload in `slot`.
    pub fn workload_in_slot(&self, slot: u32) -> Option<&EnrolledWorkload> {
        self.workloads.iter().find(|w| w.slot == slot)
    }

    /// After the configured workloads are enrolled: removes enrollments an
    /// adopted map still held for pods no longer configured.
    pub fn finish_enrollment(&mut self) {
        for cookie in std::mem::take(&mut self.stale) {
            let _ = self.enrolled_map.remove(&cookie);
            tracing::info!(
                cookie,
                "removed a stale enrollment left by the previous agent"
            );
        }
    }

    fn zero_counters(&self, slot: u32) {
        let Ok(cpus) = aya::util::nr_cpus() else {
            return;
        };
        if let Ok(zero) = PerCpuValues::try_from(vec![WorkloadCounters::default(); cpus]) {
            let mut counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
            let _ = counters.set(slot, zero, 0);
        }
    }

    pub fn workloads(&self) -> &[EnrolledWorkload] {
        &self.workloads
    }

    /// The kernel's counters for each enrolled workload, summed over CPUs.
    pub fn workload_counters(&self) -> Vec<(EnrolledWorkload, WorkloadCounters)> {
        let counters = self.counters.lock().unwrap_or_else(|e| e.into_inner());
        self.workloads
            .iter()
            .map(|w| {
                let mut total = WorkloadCounters::default();
                if let Ok(per_cpu) = counters.get(&w.slot, 0) {
                    per_cpu.iter().for_each(|c| total.add(c));
                }
                (w.clone(), total)
            })
            .collect()
    }
}
