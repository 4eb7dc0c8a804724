//! A simulated day of traffic: the fleet, each vehicle's trips, and the planted anomalies
//! (cloned plates, a traffic surge, a congestion incident, high-frequency shuttles and
//! restriction violators). Everything here is the truth; `dirt.rs` then spoils it.

use super::fleet::{Make, PlateIssuer, Vehicle};
use super::roads::{centroid, Incident, Roads, TruePass};
use crate::model::{CheckpointIdx, PlateRead};
use crate::reference::{haversine_m, City, RestrictedVehicle, RoadClass};
use chrono::NaiveDate;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;

/// Where and when the anomalies were planted.
#[derive(Clone, Debug, Default)]
pub struct Plants {
    pub clones: Vec<(usize, usize)>,
    pub surge: Option<(CheckpointIdx, i64, i64, u64)>,
    pub incident: Option<Incident>,
    pub shuttles: Vec<(usize, CheckpointIdx)>,
    pub violators: Vec<(usize, usize)>,
    /// Vehicles whose plates must stay readable (the anomalies depend on them).
    pub protected: Vec<usize>,
}

pub struct Traffic {
    pub vehicles: Vec<Vehicle>,
    pub passes: Vec<TruePass>,
    pub plants: Plants,
}

struct Sim<'a> {
    roads: Roads<'a>,
    rng: ChaCha8Rng,
    day: NaiveDate,
    day_start: i64,
    inner: Vec<CheckpointIdx>,
    boundary: Vec<CheckpointIdx>,
    vehicles: Vec<Vehicle>,
    passes: Vec<TruePass>,
}

/// Where a vehicle is and when it is free to leave again.
struct Cursor {
    vehicle: usize,
    at: CheckpointIdx,
    free_at: i64,
    pace: f64,
}

pub fn simulate_traffic(
    city: &City,
    day: NaiveDate,
    day_start: i64,
    vehicles: u32,
    local: &[String],
    mut rng: ChaCha8Rng,
) -> Traffic {
    let inner: Vec<CheckpointIdx> =
        (0..city.checkpoints.len() as u32).map(CheckpointIdx).filter(|c| !city.checkpoint(*c).boundary).collect();
    let boundary =
        (0..city.checkpoints.len() as u32).map(CheckpointIdx).filter(|c| city.checkpoint(*c).boundary).collect();
    let mut issuer = PlateIssuer::new(&city.prefixes, local);
    let fleet: Vec<Vehicle> = (0..vehicles).map(|_| issuer.vehicle(&mut rng)).collect();
    let mut sim = Sim {
        roads: Roads::new(city, day_start),
        rng,
        day,
        day_start,
        inner,
        boundary,
        vehicles: fleet,
        passes: Vec::new(),
    };
    let mut plants = Plants::default();
    let sites = Sites::choose(&sim);
    sim.plant_incident(&sites, &mut plants);
    let restricted = sim.restrictions();
    plants.violators = sim.pick_violators(&restricted);
    let originals = sim.pick_originals(&restricted);
    for v in 0..sim.vehicles.len() {
        match plants.violators.iter().find(|(x, _)| *x == v) {
            Some(&(_, rule)) => sim.violate(v, rule),
            None => sim.plan_regular(v, restricted[v], originals.contains(&v)),
        }
    }
    for &original in &originals {
        let clone = sim.plant_clone(original, &mut issuer);
        plants.clones.push((original, clone));
    }
    plants.surge = Some(sim.plant_surge(sites.surge, &mut issuer));
    sim.plant_incident_traffic(&mut issuer, plants.incident.as_ref().map(|i| i.segment));
    plants.shuttles = sim.plant_shuttles(sites.shuttle, &mut issuer);
    plants.protected = plants
        .clones
        .iter()
        .flat_map(|(a, b)| [*a, *b])
        .chain(plants.shuttles.iter().map(|s| s.0))
        .chain(plants.violators.iter().map(|v| v.0))
        .collect();
    sim.passes.sort_by_key(|p| (p.ts, p.vehicle, p.checkpoint));
    Traffic { vehicles: sim.vehicles, passes: sim.passes, plants }
}

/// The checkpoints chosen for anomalies, busiest and most central first.
pub struct Sites {
    pub surge: CheckpointIdx,
    pub shuttle: CheckpointIdx,
    pub ranked: Vec<CheckpointIdx>,
}

impl Sites {
    fn choose(sim: &Sim) -> Sites {
        let ranked = rank_central(sim.roads.city, &sim.inner);
        Sites { surge: ranked[0], shuttle: ranked[ranked.len() / 3], ranked }
    }
}

/// Inner checkpoints, arterials first, then by distance from the centre.
pub fn rank_central(city: &City, inner: &[CheckpointIdx]) -> Vec<CheckpointIdx> {
    let centre = centroid(city);
    let mut ranked = inner.to_vec();
    let key = |c: &CheckpointIdx| {
        let cp = city.checkpoint(*c);
        (cp.road_class != RoadClass::Arterial, (haversine_m(cp.position(), centre) as i64))
    };
    ranked.sort_by_key(key);
    ranked
}

impl Sim<'_> {
    fn at(&self, hours: f64) -> i64 {
        self.day_start + (hours * HOUR as f64) as i64
    }

    fn cursor(&mut self, vehicle: usize, at: CheckpointIdx) -> Cursor {
        Cursor { vehicle, at, free_at: self.day_start, pace: self.rng.gen_range(0.87..1.12) }
    }

    fn random_inner(&mut self) -> CheckpointIdx {
        *self.inner.choose(&mut self.rng).expect("a city has inner checkpoints")
    }

    /// Drives from where the cursor is to `to`, leaving no earlier than `depart`. Trips that
    /// would start in the last ten minutes of the day are not made.
    fn go(&mut self, c: &mut Cursor, depart: i64, to: CheckpointIdx) -> bool {
        let depart = depart.max(c.free_at + 2 * MIN).max(self.day_start);
        // Trips may end after midnight, but none starts in the day's last minutes.
        if depart > self.day_start + 24 * HOUR - 10 * MIN || to == c.at {
            return false;
        }
        let route = self.roads.route(c.at, to, &mut self.rng);
        self.drive(c, &route, depart)
    }

    fn drive(&mut self, c: &mut Cursor, route: &[usize], depart: i64) -> bool {
        if route.is_empty() {
            return false;
        }
        let (passes, arrival) = self.roads.drive(c.vehicle, route, depart, c.pace);
        c.at = self.roads.city.segments[*route.last().expect("non-empty route")].to;
        c.free_at = arrival;
        self.passes.extend(passes);
        true
    }

    /// Departure hour of an errand: morning and evening peaks, daytime, a little night.
    fn errand_hour(&mut self) -> f64 {
        let r = &mut self.rng;
        match r.gen_range(0..100) {
            0..=19 => normal(r, 8.0, 1.0),
            20..=44 => normal(r, 18.0, 1.2),
            45..=89 => r.gen_range(7.0..22.0),
            90..=93 => r.gen_range(22.0..24.0),
            _ => r.gen_range(0.0..7.0),
        }
        .clamp(0.0, 23.8)
    }

    /// A normal vehicle's day. `avoid`: the hours `[from, to)` it keeps off the road (a
    /// restricted digit it respects). `commuter` forces a commute (clone originals).
    fn plan_regular(&mut self, v: usize, avoid: Option<(f64, f64)>, commuter: bool) {
        let mut trips: Vec<(f64, Option<CheckpointIdx>)> = Vec::new();
        let local = self.vehicles[v].local;
        let start =
            if local { self.random_inner() } else { *self.boundary.choose(&mut self.rng).unwrap_or(&self.inner[0]) };
        let kind = self.rng.gen_range(0..100);
        if !local {
            trips.push((normal(&mut self.rng, 11.0, 3.0).clamp(5.0, 20.0), None));
            if self.rng.gen_bool(0.5) {
                trips.push((trips[0].0 + self.rng.gen_range(1.0..4.0), None));
            }
            if self.rng.gen_bool(0.6) {
                let exit = self.boundary.choose(&mut self.rng).copied();
                trips.push((trips.last().map_or(12.0, |t| t.0) + self.rng.gen_range(0.5..3.0), exit));
            }
        } else if commuter || kind < 45 {
            let work = self.random_inner();
            trips.push((normal(&mut self.rng, 7.9, 0.6), Some(work)));
            trips.push((normal(&mut self.rng, 18.0, 0.8), Some(start)));
            if self.rng.gen_bool(0.3) {
                let h = normal(&mut self.rng, 20.0, 0.8);
                trips.push((h, None));
                trips.push((h + self.rng.gen_range(0.5..1.5), Some(start)));
            }
        } else if kind < 53 && !self.boundary.is_empty() {
            // Out of the city in the morning, back home in the evening.
            let exit = self.boundary.choose(&mut self.rng).copied();
            trips.push((normal(&mut self.rng, 9.0, 1.5), exit));
            trips.push((normal(&mut self.rng, 17.5, 1.5), Some(start)));
        } else {
            for _ in 0..self.rng.gen_range(1..=3) {
                let h = self.errand_hour();
                trips.push((h, None));
            }
        }
        trips.retain(|(h, _)| avoid.is_none_or(|(from, to)| *h < from || *h >= to));
        trips.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut c = self.cursor(v, start);
        for (i, (hour, to)) in trips.into_iter().enumerate() {
            let to = to.unwrap_or_else(|| self.random_inner());
            let leaving_city = self.roads.city.checkpoint(c.at).boundary && i > 0;
            if leaving_city {
                // Back into the city later: re-enter at a boundary checkpoint.
                c.at = *self.boundary.choose(&mut self.rng).expect("boundary exists");
            }
            let depart = self.at(hour).max(c.free_at + 2 * MIN);
            self.go(&mut c, depart, to);
        }
    }

    /// For each vehicle, the hours it must keep off the road today, if any rule restricts it.
    fn restrictions(&self) -> Vec<Option<(f64, f64)>> {
        self.vehicles.iter().map(|v| self.restricted_hours(v)).collect()
    }

    /// The hours `[from, to)` a law-abiding vehicle keeps off the road today (from two hours
    /// before the earliest restriction that applies to it), if any rule restricts it.
    fn restricted_hours(&self, v: &Vehicle) -> Option<(f64, f64)> {
        let rules = self.roads.city.restrictions.as_ref()?;
        let PlateRead::Readable(plate) = PlateRead::parse(&v.plate) else { return None };
        let rv = RestrictedVehicle { plate: &plate, color: v.color, plate_type: v.plate_type, local: v.local };
        let hours: Vec<[u8; 2]> =
            rules.rules.iter().filter(|r| r.restricts(rules, self.day, &rv)).map(|r| r.hours).collect();
        let from = hours.iter().map(|h| h[0]).min()?;
        let to = hours.iter().map(|h| h[1]).max()?;
        Some((f64::from(from) - 2.0, f64::from(to)))
    }

    /// A planted vehicle that may drive at any hour: no restriction applies to it today.
    fn free_vehicle(&mut self, issuer: &mut PlateIssuer, make: Option<Make>) -> usize {
        loop {
            let v = match make {
                Some(make) => issuer.local_vehicle(&mut self.rng, make),
                None => issuer.vehicle(&mut self.rng),
            };
            if self.restricted_hours(&v).is_none() {
                return self.add(v);
            }
        }
    }

    fn pick_violators(&mut self, restricted: &[Option<(f64, f64)>]) -> Vec<(usize, usize)> {
        let Some(rules) = &self.roads.city.restrictions else { return Vec::new() };
        let want = (self.vehicles.len() / 2000).max(3);
        let mut out = Vec::new();
        for (v, r) in restricted.iter().enumerate() {
            if r.is_none() || out.len() >= want {
                continue;
            }
            let PlateRead::Readable(plate) = PlateRead::parse(&self.vehicles[v].plate) else { continue };
            let veh = &self.vehicles[v];
            let rv =
                RestrictedVehicle { plate: &plate, color: veh.color, plate_type: veh.plate_type, local: veh.local };
            if let Some(rule) = rules.rules.iter().position(|rule| rule.restricts(rules, self.day, &rv)) {
                out.push((v, rule));
            }
        }
        out
    }

    /// A restricted vehicle that drives anyway: a trip inside the rule's zone during its hours,
    /// and back.
    fn violate(&mut self, v: usize, rule: usize) {
        let city = self.roads.city;
        let Some(rules) = &city.restrictions else { return };
        let r = &rules.rules[rule];
        let zone: Vec<CheckpointIdx> = self.inner.iter().copied().filter(|c| r.covers(city.checkpoint(*c))).collect();
        if zone.len() < 2 {
            return;
        }
        let home = *zone.choose(&mut self.rng).expect("zone has checkpoints");
        let away = **zone
            .iter()
            .filter(|c| **c != home)
            .collect::<Vec<_>>()
            .choose(&mut self.rng)
            .expect("two zone checkpoints");
        let (start, end) = (f64::from(r.hours[0]), f64::from(r.hours[1]));
        let hour = self.rng.gen_range(start + 0.25..(end - 3.0).max(start + 0.5));
        let mut c = self.cursor(v, home);
        self.go(&mut c, self.at(hour), away);
        let stay = self.rng.gen_range(1.0..2.0);
        let back = self.at(hour + stay);
        self.go(&mut c, back, home);
    }

    fn pick_originals(&mut self, restricted: &[Option<(f64, f64)>]) -> Vec<usize> {
        let want = (self.vehicles.len() / 5000).max(2);
        (0..self.vehicles.len())
            .filter(|v| self.vehicles[*v].local && restricted[*v].is_none() && self.vehicles[*v].plate_type == "02")
            .take(want)
            .collect()
    }

    /// A second car with the same plate, driving far away at the same time as the original.
    fn plant_clone(&mut self, original: usize, issuer: &mut PlateIssuer) -> usize {
        let city = self.roads.city;
        let anchor =
            self.passes.iter().filter(|p| p.vehicle == original).min_by_key(|p| p.ts).map(|p| (p.checkpoint, p.ts));
        let (a, t) = anchor.unwrap_or((self.inner[0], self.at(9.0)));
        let far: Vec<CheckpointIdx> = self
            .inner
            .iter()
            .copied()
            .filter(|c| haversine_m(city.checkpoint(*c).position(), city.checkpoint(a).position()) >= 6_000.0)
            .collect();
        let start = far.choose(&mut self.rng).copied().unwrap_or(self.inner[self.inner.len() - 1]);
        let template = issuer.local_vehicle(&mut self.rng, Make::Car);
        let mut clone = self.vehicles[original].clone();
        clone.vehicle_type = if self.rng.gen_bool(0.5) { "K33" } else { template.vehicle_type };
        self.vehicles.push(clone);
        let v = self.vehicles.len() - 1;
        let mut c = self.cursor(v, start);
        let depart = t + self.rng.gen_range(-60_000..60_000);
        let first_to = self.random_inner();
        self.go(&mut c, depart, first_to);
        let hour = self.rng.gen_range(12.0..16.0);
        let later = self.at(hour);
        let to = self.random_inner();
        self.go(&mut c, later, to);
        v
    }

    /// A crowd leaving one checkpoint within 25 minutes (an event letting out).
    fn plant_surge(&mut self, at: CheckpointIdx, issuer: &mut PlateIssuer) -> (CheckpointIdx, i64, i64, u64) {
        let (from, to) = (self.at(15.0), self.at(15.0) + 25 * MIN);
        let n = 400;
        for _ in 0..n {
            let v = self.free_vehicle(issuer, None);
            let mut c = self.cursor(v, at);
            let depart = self.rng.gen_range(from..to);
            let dest = self.random_inner();
            self.go(&mut c, depart, dest);
        }
        (at, from, to, n)
    }

    fn plant_incident(&mut self, sites: &Sites, plants: &mut Plants) {
        let city = self.roads.city;
        let avoid = [sites.surge, sites.shuttle];
        let segment =
            sites.ranked.iter().flat_map(|c| self.roads.neighbours(*c).map(move |n| (*c, n))).find(|(a, b)| {
                !avoid.contains(a)
                    && !avoid.contains(b)
                    && !city.checkpoint(*b).boundary
                    && city.segments[self.roads.segment_between(*a, *b).expect("neighbour")].road_class
                        == RoadClass::Arterial
            });
        let Some((a, b)) = segment else { return };
        let segment = self.roads.segment_between(a, b).expect("neighbour");
        let incident =
            Incident { segment, from_ms: self.at(13.0) + 5 * MIN, to_ms: self.at(13.0) + 40 * MIN, slowdown: 5.0 };
        self.roads.incidents.push(incident.clone());
        plants.incident = Some(incident);
    }

    /// Traffic through the incident segment before and during the incident.
    fn plant_incident_traffic(&mut self, issuer: &mut PlateIssuer, segment: Option<usize>) {
        let Some(s) = segment else { return };
        let (from, to) = (self.roads.city.segments[s].from, self.roads.city.segments[s].to);
        for _ in 0..80 {
            let v = self.free_vehicle(issuer, None);
            let mut c = self.cursor(v, from);
            let depart = self.rng.gen_range(self.at(12.75)..self.at(13.0) + 38 * MIN);
            let dest = self.random_inner();
            let mut route = vec![s];
            route.extend(self.roads.route(to, dest, &mut self.rng));
            self.drive(&mut c, &route, depart);
        }
    }

    /// Shuttles between a checkpoint and its neighbour all day: high-frequency vehicles.
    fn plant_shuttles(&mut self, at: CheckpointIdx, issuer: &mut PlateIssuer) -> Vec<(usize, CheckpointIdx)> {
        let Some(other) = self.roads.neighbours(at).find(|n| !self.roads.city.checkpoint(*n).boundary) else {
            return Vec::new();
        };
        (0..5)
            .map(|_| {
                let v = self.free_vehicle(issuer, Some(Make::Car));
                let mut c = self.cursor(v, at);
                let mut t = self.at(7.0) + self.rng.gen_range(0..30 * MIN);
                while t < self.at(21.0) {
                    let to = if c.at == at { other } else { at };
                    self.go(&mut c, t, to);
                    t = c.free_at + self.rng.gen_range(15 * MIN..35 * MIN);
                }
                (v, at)
            })
            .collect()
    }

    fn add(&mut self, v: Vehicle) -> usize {
        self.vehicles.push(v);
        self.vehicles.len() - 1
    }
}

/// A normally distributed draw (Box–Muller).
fn normal(rng: &mut ChaCha8Rng, mean: f64, sd: f64) -> f64 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen_range(0.0..1.0);
    mean + sd * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}
