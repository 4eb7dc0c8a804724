//! `passflow simulate`: a labelled simulated day in a folder.

use crate::config::Config;
use crate::simulator::{sample_city, simulate_to, Labels, SimParams};
use chrono::NaiveDate;
use std::path::Path;

pub fn simulate(config: &Config, out: &Path, vehicles: u32, day: NaiveDate, seed: u64) -> anyhow::Result<Labels> {
    let params = SimParams {
        day,
        vehicles,
        seed,
        time_zone: config.city.tz()?,
        local_prefixes: config.city.local_prefixes.clone(),
    };
    simulate_to(out, &sample_city(), &params)
}
