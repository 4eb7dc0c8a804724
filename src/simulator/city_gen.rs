//! The simulator's road network: a grid city with a ring expressway, two arterials each way
//! that run out of the city as national roads (the boundary checkpoints), secondary streets,
//! and five districts.

use crate::model::{CheckpointIdx, Direction};
use crate::reference::{haversine_m, Checkpoint, City, Region, RestrictionRules, RoadClass, Segment};

/// Intersections per side of the grid.
const GRID: usize = 10;
const SPACING_M: f64 = 1_200.0;
/// How far outside the grid the boundary checkpoints stand.
const BOUNDARY_OFFSET_M: f64 = 2_500.0;
const CENTRE: (f64, f64) = (115.892, 28.676);
const ARTERIALS: [usize; 2] = [3, 6];
const STREETS: [&str; GRID] = ["南环", "青山", "洪都", "井冈山", "解放", "民德", "阳明", "八一", "叠山", "北环"];
const AVENUES: [&str; GRID] = ["西环", "抚河", "象山", "胜利", "中山", "八一大道", "青山湖", "上海", "昌东", "东环"];
const REGIONS: [(&str, &str); 5] =
    [("R1", "东湖区"), ("R2", "西湖区"), ("R3", "青云谱区"), ("R4", "青山湖区"), ("R5", "红谷滩中心区")];

fn line_class(i: usize) -> RoadClass {
    match i {
        0 | 9 => RoadClass::Expressway,
        3 | 6 => RoadClass::Arterial,
        _ => RoadClass::Secondary,
    }
}

fn rank(class: RoadClass) -> u8 {
    match class {
        RoadClass::Expressway => 3,
        RoadClass::Arterial => 2,
        RoadClass::Secondary => 1,
    }
}

/// Free-flow and limit speeds of a road class, km/h.
pub fn class_speeds(class: RoadClass) -> (f64, u16) {
    match class {
        RoadClass::Expressway => (80.0, 100),
        RoadClass::Arterial => (50.0, 60),
        RoadClass::Secondary => (35.0, 40),
    }
}

fn region_of(row: usize, col: usize) -> &'static str {
    let central = (3..=6).contains(&row) && (3..=6).contains(&col);
    match (central, row < GRID / 2, col < GRID / 2) {
        (true, _, _) => "R5",
        (false, true, true) => "R1",
        (false, true, false) => "R2",
        (false, false, true) => "R3",
        (false, false, false) => "R4",
    }
}

/// Position of grid point (row, col), rows counting northwards, columns eastwards; fractional
/// indices place the boundary checkpoints.
fn position(row: f64, col: f64) -> (f64, f64) {
    let lat_step = SPACING_M / 111_195.0;
    let lon_step = lat_step / CENTRE.1.to_radians().cos();
    let mid = (GRID as f64 - 1.0) / 2.0;
    ((CENTRE.0 + (col - mid) * lon_step), (CENTRE.1 + (row - mid) * lat_step))
}

/// Builds the sample grid city (the layout is fixed; only the restriction rules vary).
pub fn grid_city(restrictions: Option<RestrictionRules>) -> City {
    let mut checkpoints = Vec::new();
    for row in 0..GRID {
        for col in 0..GRID {
            let class = if rank(line_class(row)) >= rank(line_class(col)) { line_class(row) } else { line_class(col) };
            let (_, limit) = class_speeds(class);
            let (lon, lat) = position(row as f64, col as f64);
            checkpoints.push(Checkpoint {
                id: format!("KK{:04}", row * GRID + col + 1).into(),
                name: format!("{}路与{}路口", STREETS[row], AVENUES[col]),
                lon: round6(lon),
                lat: round6(lat),
                region_id: region_of(row, col).into(),
                road_class: class,
                boundary: false,
                inbound_direction: None,
                bus_lanes: if class == RoadClass::Arterial { vec![3] } else { vec![] },
                speed_limit_kmh: limit,
            });
        }
    }
    let mut segments = Vec::new();
    let idx = |row: usize, col: usize| CheckpointIdx((row * GRID + col) as u32);
    for row in 0..GRID {
        for col in 0..GRID {
            if col + 1 < GRID {
                link(&mut segments, &checkpoints, idx(row, col), idx(row, col + 1), line_class(row));
            }
            if row + 1 < GRID {
                link(&mut segments, &checkpoints, idx(row, col), idx(row + 1, col), line_class(col));
            }
        }
    }
    add_boundaries(&mut checkpoints, &mut segments);
    let regions = REGIONS.iter().map(|(id, name)| Region { id: (*id).into(), name: (*name).into() }).collect();
    City::from_parts(checkpoints, segments, regions, restrictions)
}

/// Boundary checkpoints where the arterials leave the city, one at each end of each arterial.
fn add_boundaries(checkpoints: &mut Vec<Checkpoint>, segments: &mut Vec<Segment>) {
    let out = BOUNDARY_OFFSET_M / SPACING_M;
    let last = (GRID - 1) as f64;
    let mut n = 0;
    for line in ARTERIALS {
        let l = line as f64;
        // (position, inner grid point, inbound direction)
        let ends = [
            ((l, -out), (line, 0), Direction::WEST_TO_EAST),
            ((l, last + out), (line, GRID - 1), Direction::EAST_TO_WEST),
            ((-out, l), (0, line), Direction::SOUTH_TO_NORTH),
            ((last + out, l), (GRID - 1, line), Direction::NORTH_TO_SOUTH),
        ];
        for ((row, col), (irow, icol), inbound) in ends {
            n += 1;
            let (lon, lat) = position(row, col);
            let inner = CheckpointIdx((irow * GRID + icol) as u32);
            checkpoints.push(Checkpoint {
                id: format!("KB{n:03}").into(),
                name: format!("入城卡口{n}"),
                lon: round6(lon),
                lat: round6(lat),
                region_id: checkpoints[inner.0 as usize].region_id.clone(),
                road_class: RoadClass::Arterial,
                boundary: true,
                inbound_direction: Some(inbound),
                bus_lanes: vec![],
                speed_limit_kmh: 80,
            });
            let outer = CheckpointIdx(checkpoints.len() as u32 - 1);
            link(segments, checkpoints, outer, inner, RoadClass::Arterial);
        }
    }
}

/// Two directed segments, one each way.
fn link(segments: &mut Vec<Segment>, checkpoints: &[Checkpoint], a: CheckpointIdx, b: CheckpointIdx, class: RoadClass) {
    let (ca, cb) = (&checkpoints[a.0 as usize], &checkpoints[b.0 as usize]);
    let length_m = haversine_m(ca.position(), cb.position()).round();
    let (free_flow_kmh, _) = class_speeds(class);
    for (from, to, region) in [(a, b, cb.region_id.clone()), (b, a, ca.region_id.clone())] {
        segments.push(Segment {
            id: format!("SG{:04}", segments.len() + 1).into(),
            from,
            to,
            length_m,
            free_flow_kmh,
            road_class: class,
            region_id: region,
        });
    }
}

fn round6(v: f64) -> f64 {
    (v * 1e6).round() / 1e6
}
