//! A multi-machine `up` (or `reload`): what the machines brought up together tell each other (see [`Round`]).

use std::sync::Mutex;

use crate::config::Config;

/// A multi-machine `up` (or `reload`) of several machines at once. A machine's own health round cannot judge
/// what lives on the others while they are still being provisioned (the monitor's Prometheus scraping the app
/// machines), so it leaves Prometheus' targets on them out of its verdict ([`Round::hosts_coming_up`]) and
/// records itself here; once every machine's run has ended, the command's final round judges the whole project and takes
/// the lab captures that waited for that judgement.
pub struct Round {
    /// The machines this run brings up.
    machines: Vec<String>,
    judged: Mutex<Vec<Judged>>,
}

/// A machine whose own health round ended healthy in a [`Round`].
pub struct Judged {
    pub machine: String,
    /// Whether targets on other machines of the run were left out of its verdict.
    pub deferred: bool,
    /// The lab capture (cache plan, box id) left for the final round, as its judgement was not final.
    pub capture: Option<(super::lab_cache::Plan, Option<String>)>,
}

impl Round {
    pub fn new(machines: Vec<String>) -> Self {
        Round { machines, judged: Mutex::new(Vec::new()) }
    }

    /// How Prometheus' targets may name the other machines of this run: name, host name, private address. Pure.
    pub fn hosts_coming_up(&self, cfg: &Config) -> Vec<String> {
        let Some(member) = &cfg.member else { return Vec::new() };
        let mut hosts = Vec::new();
        for peer in
            member.peers.iter().filter(|p| p.name != cfg.machine.name && self.machines.contains(&p.name))
        {
            for h in [peer.name.clone(), peer.hostname.clone(), peer.ip.to_string()] {
                if !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
        }
        hosts
    }

    pub fn record(&self, j: Judged) {
        self.judged.lock().expect("judged").push(j);
    }

    /// Every machine recorded so far, taken out (for the final round).
    pub fn take_judged(&self) -> Vec<Judged> {
        std::mem::take(&mut *self.judged.lock().expect("judged"))
    }
}
