//! L4 policy evaluated by the connect hooks: allow or deny an enrolled pod's
//! connects by source workload, destination network and port. The first rule
//! that matches decides; a connect no rule matches is allowed. A denied
//! connect fails in the caller with `EPERM` ("Operation not permitted").

use std::net::IpAddr;
use std::str::FromStr;

use aya::maps::PerCpuValues;
use serde::{Deserialize, Serialize};
use wisp_common::{
    ANY_WORKLOAD, MAX_POLICY_RULES, POLICY_ALLOW, POLICY_DENY, PolicyRule, addr_to_words, maps,
};

use super::{Dataplane, EbpfError, RuleStats, per_cpu_sums};

/// `allow` or `deny`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyAction {
    Allow,
    Deny,
}

impl PolicyAction {
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyAction::Allow => "allow",
            PolicyAction::Deny => "deny",
        }
    }
}

/// A destination network: `10.0.0.0/8`, `fd00::/64`, or one address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|e| format!("not an IP network (`10.0.0.0/8`, `fd00::/64`): {e}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl Cidr {
    /// Network and mask in the kernel's form (16 bytes, IPv4 mapped).
    pub fn to_words(self) -> ([u32; 4], [u32; 4]) {
        // In the mapped form an IPv4 prefix covers the 96 mapped bits too.
        let bits = if self.addr.is_ipv4() {
            96 + u32::from(self.prefix)
        } else {
            u32::from(self.prefix)
        };
        let mask_bytes: [u8; 16] = (u128::MAX.checked_shl(128 - bits).unwrap_or(0)).to_be_bytes();
        let mut mask = [0u32; 4];
        for (i, word) in mask.iter_mut().enumerate() {
            *word = u32::from_ne_bytes([
                mask_bytes[4 * i],
                mask_bytes[4 * i + 1],
                mask_bytes[4 * i + 2],
                mask_bytes[4 * i + 3],
            ]);
        }
        let addr = addr_to_words(self.addr);
        let net = [
            addr[0] & mask[0],
            addr[1] & mask[1],
            addr[2] & mask[2],
            addr[3] & mask[3],
        ];
        (net, mask)
    }
}

/// A rule with its workload already resolved to an enrollment slot.
#[derive(Clone, Debug)]
pub struct ResolvedRule {
    pub name: String,
    pub action: PolicyAction,
    /// `None`: any enrolled workload.
    pub src_slot: Option<u32>,
    pub to: Option<Cidr>,
    pub port: Option<u16>,
}

impl ResolvedRule {
    pub fn to_kernel(&self) -> PolicyRule {
        let (dst_ip, dst_mask) = self.to.map(Cidr::to_words).unwrap_or_default();
        PolicyRule {
            dst_ip,
            dst_mask,
            src_slot: self.src_slot.unwrap_or(ANY_WORKLOAD),
            dst_port: self.port.unwrap_or(0),
            action: match self.action {
                PolicyAction::Allow => POLICY_ALLOW,
                PolicyAction::Deny => POLICY_DENY,
            },
            used: 1,
        }
    }
}

/// The L4 policy as the dataplane keeps it.
impl Dataplane {
    /// Replaces the kernel's L4 policy with `rules` (first match wins) and
    /// resets their counters.
    pub fn set_policy(&mut self, rules: &[ResolvedRule]) -> Result<(), EbpfError> {
        if rules.len() > MAX_POLICY_RULES as usize {
            return Err(EbpfError::TooManyRules);
        }
        let map_err = |source| EbpfError::Map {
            name: maps::POLICY,
            source,
        };
        // Write from the end so that the list never has a hole in between.
        for i in (0..MAX_POLICY_RULES).rev() {
            let rule = rules
                .get(i as usize)
                .map_or_else(PolicyRule::default, ResolvedRule::to_kernel);
            self.policy_map.set(i, rule, 0).map_err(map_err)?;
        }
        if let Ok(cpus) = aya::util::nr_cpus() {
            let mut counters = self
                .policy_counters
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for i in 0..rules.len() as u32 {
                if let Ok(zero) = PerCpuValues::try_from(vec![0u64; cpus]) {
                    let _ = counters.set(i, zero, 0);
                }
            }
        }
        self.rules = rules.iter().map(|r| (r.name.clone(), r.action)).collect();
        if !rules.is_empty() {
            tracing::info!(rules = rules.len(), "L4 policy loaded");
        }
        Ok(())
    }

    /// How many connects each policy rule matched.
    pub fn policy_counters(&self) -> Vec<RuleStats> {
        let matches = per_cpu_sums(&self.policy_counters, self.rules.len());
        self.rules
            .iter()
            .zip(matches)
            .map(|((name, action), matches)| RuleStats {
                name: name.clone(),
                action: *action,
                matches,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_cidr_masks_the_mapped_form() {
        let (net, mask) = "10.213.40.0/24".parse::<Cidr>().unwrap().to_words();
        assert_eq!(
            mask,
            [u32::MAX, u32::MAX, u32::MAX, u32::from_be(0xffff_ff00)]
        );
        assert_eq!(net, addr_to_words("10.213.40.0".parse().unwrap()));
        let any = "0.0.0.0/0".parse::<Cidr>().unwrap().to_words();
        assert_eq!(any.1, [u32::MAX, u32::MAX, u32::MAX, 0], "still IPv4 only");
        let (_, mask6) = "fd00::/16".parse::<Cidr>().unwrap().to_words();
        assert_eq!(mask6, [u32::from_be(0xffff_0000), 0, 0, 0]);
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert_eq!("10.1.2.3".parse::<Cidr>().unwrap().prefix, 32);
    }
}

/// One rule as written in the agent config (`policy:`).
///
/// ```yaml
/// policy:
///   - name: no-db-from-web      # for logs and the per-rule counters; default rule-N
///     action: deny              # allow | deny
///     from: default/web-0       # an enrolled workload; default any
///     to: 10.96.0.0/12          # destination network; default any (IPv4 and IPv6)
///     port: 5432                # destination port; default any
/// ```
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRuleSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub action: serde_saphyr::Spanned<PolicyAction>,
    #[serde(default)]
    pub from: Option<serde_saphyr::Spanned<String>>,
    #[serde(default)]
    pub to: Option<crate::config::Located<Cidr>>,
    #[serde(default)]
    pub port: Option<u16>,
}

impl PolicyRuleSpec {
    pub fn name(&self, index: usize) -> String {
        self.name.clone().unwrap_or_else(|| format!("rule-{index}"))
    }

    /// What `Config::validate` reports: `(line, field, message)`.
    pub fn check(
        &self,
        index: usize,
        workloads: &[crate::config::WorkloadSpec],
    ) -> Result<(), (u64, String, String)> {
        if index >= wisp_common::MAX_POLICY_RULES as usize {
            return Err((
                self.action.referenced.line(),
                format!("policy[{index}]"),
                format!(
                    "too many rules: the kernel evaluates at most {}",
                    wisp_common::MAX_POLICY_RULES
                ),
            ));
        }
        if let Some(from) = &self.from
            && !workloads.iter().any(|w| w.name == from.value)
        {
            return Err((
                from.referenced.line(),
                format!("policy[{index}].from"),
                format!(
                    "no workload named {:?} (policy applies to enrolled workloads; name one from `workloads`)",
                    from.value
                ),
            ));
        }
        if self.port == Some(0) {
            return Err((
                self.action.referenced.line(),
                format!("policy[{index}].port"),
                "0 is not a port; leave `port` out to match any".into(),
            ));
        }
        Ok(())
    }

    /// With `from` resolved against the enrolled workloads.
    pub fn resolve(&self, index: usize, workloads: &[super::EnrolledWorkload]) -> ResolvedRule {
        let src_slot = self.from.as_ref().map(|from| {
            workloads
                .iter()
                .find(|w| w.name == from.value)
                .map_or(wisp_common::ANY_WORKLOAD - 1, |w| w.slot)
        });
        ResolvedRule {
            name: self.name(index),
            action: self.action.value,
            src_slot,
            to: self.to.as_ref().map(|t| t.value),
            port: self.port,
        }
    }
}
