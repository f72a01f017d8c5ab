//! The poll plan: a device's points coalesced into as few Modbus reads as the
//! protocol allows, and the wire time those reads cost on a given bus.

use std::time::Duration;

use crate::config::{self, Address, Area, Point};
use crate::modbus::Request;

/// Time a slave is allowed to think between request and response, on top of
/// the wire time, when estimating a cycle.
pub const TURNAROUND: Duration = Duration::from_millis(2);

/// One read request covering consecutive registers (or bits) of one area.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    pub area: Area,
    pub start: Address,
    pub count: u16,
    /// Indices into the device's points, in address order.
    pub points: Vec<usize>,
}

impl Block {
    pub fn request(&self) -> Request {
        Request::read(self.area, self.start, self.count)
    }

    fn end(&self) -> u32 {
        u32::from(self.start) + u32::from(self.count)
    }
}

/// Wire time of one transaction: request and response frames, the
/// 3.5-character gap after each, the slave's turnaround and the bus `delay`.
pub fn transaction_time(bus: &config::Bus, request: &Request) -> Duration {
    let (req, resp) = request.frame_sizes();
    bus.char_time(req + resp) + 2 * bus.frame_gap() + TURNAROUND + bus.delay
}

/// Extra wire time of reading `gap` unused registers/bits inside a block.
fn gap_time(bus: &config::Bus, area: Area, gap: u32) -> Duration {
    let bytes = if area.is_bits() {
        gap.div_ceil(8)
    } else {
        gap * 2
    };
    bus.char_time(bytes as usize)
}

/// Coalesces `points` into blocks: same area only, at most 125 registers or
/// 2000 bits, never splitting a point, and bridging a gap only when reading
/// it costs less wire time than a separate request would.
pub fn plan(points: &[Point], bus: &config::Bus) -> Vec<Block> {
    plan_of(points, (0..points.len()).collect(), bus)
}

/// The blocks one poll reads (indices into `blocks`), as requests: blocks
/// of the same area that adjoin (the points of several intervals due
/// together) become one request while it stays within the protocol's
/// limit. Only adjoining blocks are joined, so no request reads a register
/// that a single block did not: a slave that refuses unmapped gaps is not
/// asked for one. Each request comes with the blocks it covers.
pub fn join_adjoining(blocks: &[Block], due: &[usize]) -> Vec<(Vec<usize>, Block)> {
    let mut order: Vec<usize> = due.iter().copied().filter(|&b| b < blocks.len()).collect();
    // Areas in the order the plan first reads them, addresses ascending
    // within each: the requests keep the plan's order.
    let mut areas: Vec<Area> = Vec::new();
    for &b in &order {
        if !areas.contains(&blocks[b].area) {
            areas.push(blocks[b].area);
        }
    }
    order.sort_by_key(|&b| {
        let rank = areas.iter().position(|&a| a == blocks[b].area);
        (rank, blocks[b].start)
    });
    let mut out: Vec<(Vec<usize>, Block)> = Vec::new();
    for b in order {
        let block = &blocks[b];
        if let Some((parts, joined)) = out.last_mut() {
            let adjoins = joined.area == block.area && joined.end() == u32::from(block.start);
            let fits = u32::from(joined.count) + u32::from(block.count)
                <= u32::from(block.area.max_per_read());
            if adjoins && fits {
                joined.count += block.count;
                joined.points.extend(&block.points);
                parts.push(b);
                continue;
            }
        }
        out.push((vec![b], block.clone()));
    }
    out
}

/// Points of one poll interval and the blocks that read them.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    pub every: Duration,
    pub blocks: Vec<Block>,
}

/// `device`'s points grouped by poll interval (the device's first, then
/// the points' own `poll`s, shortest first), each group coalesced on its
/// own: a slow point never widens the reads of the fast ones.
pub fn schedule(device: &config::Device, bus: &config::Bus) -> Vec<Interval> {
    let every = |p: &Point| p.poll.unwrap_or(device.poll);
    let mut intervals: Vec<Duration> = vec![device.poll];
    let mut own: Vec<Duration> = device
        .points
        .iter()
        .map(every)
        .filter(|d| *d != device.poll)
        .collect();
    own.sort();
    own.dedup();
    intervals.extend(own);
    intervals
        .into_iter()
        .map(|interval| Interval {
            every: interval,
            blocks: plan_of(
                &device.points,
                (0..device.points.len())
                    .filter(|&i| every(&device.points[i]) == interval)
                    .collect(),
                bus,
            ),
        })
        .filter(|i| !i.blocks.is_empty())
        .collect()
}

/// [`plan`] for the points `members` (indices into `points`).
fn plan_of(points: &[Point], mut order: Vec<usize>, bus: &config::Bus) -> Vec<Block> {
    order.sort_by_key(|&i| (points[i].area, points[i].address, points[i].end()));
    let extra_request = transaction_time(bus, &Request::ReadHolding(0, 0));
    let mut blocks: Vec<Block> = Vec::new();
    for i in order {
        let p = &points[i];
        if let Some(block) = blocks.last_mut().filter(|b| b.area == p.area) {
            let end = block.end().max(p.end());
            let fits = end - u32::from(block.start) <= u32::from(p.area.max_per_read());
            let gap = u32::from(p.address).saturating_sub(block.end());
            if fits && (gap == 0 || gap_time(bus, p.area, gap) < extra_request) {
                block.count = (end - u32::from(block.start)) as u16;
                block.points.push(i);
                continue;
            }
        }
        blocks.push(Block {
            area: p.area,
            start: p.address,
            count: p.kind.width(),
            points: vec![i],
        });
    }
    blocks
}

/// Splits `block` where it bridges unused addresses, for slaves that answer
/// a read across unmapped registers with "illegal data address". Returns a
/// single block unchanged when it has no gap.
pub fn without_gaps(block: &Block, points: &[Point]) -> Vec<Block> {
    let mut out: Vec<Block> = Vec::new();
    for &i in &block.points {
        let p = &points[i];
        match out.last_mut() {
            Some(run) if u32::from(p.address) <= run.end() => {
                run.count = (run.end().max(p.end()) - u32::from(run.start)) as u16;
                run.points.push(i);
            }
            _ => out.push(Block {
                area: block.area,
                start: p.address,
                count: p.kind.width(),
                points: vec![i],
            }),
        }
    }
    out
}

/// Estimated bus time of one poll of these blocks.
pub fn cycle_time(bus: &config::Bus, blocks: &[Block]) -> Duration {
    blocks
        .iter()
        .map(|b| transaction_time(bus, &b.request()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BusMode, Kind, Order, Parity};

    fn bus(baud: u32) -> config::Bus {
        config::Bus {
            transport: config::Transport::Serial,
            name: "b".into(),
            port: "/dev/null".into(),
            baud,
            parity: Parity::None,
            data_bits: 8,
            stop_bits: 1,
            timeout: Duration::from_millis(500),
            retries: 1,
            delay: Duration::ZERO,
            mode: BusMode::Rtu,
        }
    }

    fn pt(area: Area, address: Address, kind: Kind) -> Point {
        Point {
            name: format!("p{address}"),
            area,
            address,
            kind,
            order: Order::Abcd,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            writable: false,
            min: None,
            max: None,
            deadband: 0.0,
            labels: Vec::new(),
            alarm: None,
            poll: None,
            sim: None,
        }
    }

    fn spans(blocks: &[Block]) -> Vec<(Area, u16, u16)> {
        blocks.iter().map(|b| (b.area, b.start, b.count)).collect()
    }

    #[test]
    fn adjacent_points_share_one_read() {
        let points = [
            pt(Area::Holding, 0, Kind::U16),
            pt(Area::Holding, 1, Kind::F32),
            pt(Area::Holding, 3, Kind::U64),
        ];
        assert_eq!(spans(&plan(&points, &bus(9600))), [(Area::Holding, 0, 7)]);
    }

    #[test]
    fn small_gaps_are_bridged_large_ones_are_not() {
        // At 9600 8N1 a character is 1.04 ms; another request costs
        // 13 chars + 2 x 3.5 chars + 2 ms = ~22.9 ms, i.e. ~11 registers.
        let b = bus(9600);
        let near = [
            pt(Area::Input, 0, Kind::U16),
            pt(Area::Input, 10, Kind::U16),
        ];
        assert_eq!(spans(&plan(&near, &b)), [(Area::Input, 0, 11)]);
        let far = [
            pt(Area::Input, 0, Kind::U16),
            pt(Area::Input, 12, Kind::U16),
        ];
        assert_eq!(
            spans(&plan(&far, &b)),
            [(Area::Input, 0, 1), (Area::Input, 12, 1)]
        );
        // At 115200 characters are cheap next to the fixed 1.75 ms gaps and
        // the turnaround, so wider gaps are worth reading.
        let wide = [
            pt(Area::Input, 0, Kind::U16),
            pt(Area::Input, 30, Kind::U16),
        ];
        assert_eq!(spans(&plan(&wide, &bus(115_200))), [(Area::Input, 0, 31)]);
    }

    #[test]
    fn register_limit_is_125_and_points_are_never_split() {
        let points: Vec<Point> = (0..70)
            .map(|i| pt(Area::Holding, i * 2, Kind::U32))
            .collect();
        let blocks = plan(&points, &bus(9600));
        assert_eq!(
            spans(&blocks),
            [(Area::Holding, 0, 124), (Area::Holding, 124, 16)]
        );
        // A point that would cross the 125 edge starts the next block...
        let mut edge: Vec<Point> = (0..124).map(|i| pt(Area::Holding, i, Kind::U16)).collect();
        edge.push(pt(Area::Holding, 124, Kind::U32));
        assert_eq!(
            spans(&plan(&edge, &bus(9600))),
            [(Area::Holding, 0, 124), (Area::Holding, 124, 2)]
        );
        // ...and one that ends exactly on it does not.
        let mut exact: Vec<Point> = (0..121).map(|i| pt(Area::Holding, i, Kind::U16)).collect();
        exact.push(pt(Area::Holding, 121, Kind::U64));
        assert_eq!(spans(&plan(&exact, &bus(9600))), [(Area::Holding, 0, 125)]);
    }

    #[test]
    fn bit_limit_is_2000() {
        let points: Vec<Point> = (0..2001).map(|i| pt(Area::Coil, i, Kind::Bit)).collect();
        assert_eq!(
            spans(&plan(&points, &bus(9600))),
            [(Area::Coil, 0, 2000), (Area::Coil, 2000, 1)]
        );
        // Bit gaps are 8 to the byte: 100 unused coils cost ~13 chars.
        let gap = [
            pt(Area::Discrete, 0, Kind::Bit),
            pt(Area::Discrete, 100, Kind::Bit),
        ];
        assert_eq!(spans(&plan(&gap, &bus(9600))), [(Area::Discrete, 0, 101)]);
    }

    #[test]
    fn areas_are_never_mixed() {
        let points = [
            pt(Area::Holding, 0, Kind::U16),
            pt(Area::Input, 1, Kind::U16),
            pt(Area::Holding, 1, Kind::U16),
            pt(Area::Coil, 0, Kind::Bit),
            pt(Area::Discrete, 1, Kind::Bit),
        ];
        let blocks = plan(&points, &bus(9600));
        assert_eq!(
            spans(&blocks),
            [
                (Area::Coil, 0, 1),
                (Area::Discrete, 1, 1),
                (Area::Input, 1, 1),
                (Area::Holding, 0, 2)
            ]
        );
        assert_eq!(blocks[3].points, [0, 2]);
    }

    #[test]
    fn overlapping_points_share_registers() {
        let points = [
            pt(Area::Holding, 5, Kind::RegisterBit(0)),
            pt(Area::Holding, 5, Kind::RegisterBit(7)),
            pt(Area::Holding, 4, Kind::U32),
        ];
        assert_eq!(spans(&plan(&points, &bus(9600))), [(Area::Holding, 4, 2)]);
    }

    #[test]
    fn gaps_can_be_taken_out_again() {
        let points = [
            pt(Area::Holding, 0, Kind::U32),
            pt(Area::Holding, 1, Kind::U16),
            pt(Area::Holding, 6, Kind::U16),
            pt(Area::Holding, 7, Kind::F32),
        ];
        let blocks = plan(&points, &bus(9600));
        assert_eq!(spans(&blocks), [(Area::Holding, 0, 9)]);
        let split = without_gaps(&blocks[0], &points);
        assert_eq!(
            spans(&split),
            [(Area::Holding, 0, 2), (Area::Holding, 6, 3)]
        );
        assert_eq!(split[1].points, [2, 3]);
        assert_eq!(without_gaps(&split[0], &points), split[..1]);
    }

    #[test]
    fn cycle_time_counts_frames_gaps_and_turnaround() {
        let b = bus(9600);
        // FC03 x 10 registers: 8 + 25 bytes = 33 chars x 10 bits / 9600.
        let blocks = [Block {
            area: Area::Holding,
            start: 0,
            count: 10,
            points: vec![],
        }];
        let expect = Duration::from_nanos(33 * 10 * 1_000_000_000 / 9600)
            + 2 * Duration::from_nanos(35 * 1_000_000_000 / 9600)
            + TURNAROUND;
        let got = cycle_time(&b, &blocks);
        assert!(
            got.abs_diff(expect) < Duration::from_micros(2),
            "{got:?} vs {expect:?}"
        );
    }

    #[test]
    fn only_adjoining_blocks_of_one_area_within_the_limit_are_joined() {
        let block = |area, start, count, points: &[usize]| Block {
            area,
            start,
            count,
            points: points.to_vec(),
        };
        let blocks = vec![
            block(Area::Holding, 10, 2, &[2]),
            block(Area::Holding, 0, 10, &[0, 1]),
            block(Area::Input, 12, 1, &[3]),
            block(Area::Holding, 13, 1, &[4]),
            block(Area::Holding, 100, 100, &[5]),
            block(Area::Holding, 200, 26, &[6]),
        ];
        let joined = join_adjoining(&blocks, &[0, 1, 2, 3, 4, 5]);
        assert_eq!(
            joined,
            [
                // 0..10 and 10..12 adjoin; 13 is past a gap; 100..200 and
                // 200..226 adjoin but would be 126 registers.
                (vec![1, 0], block(Area::Holding, 0, 12, &[0, 1, 2])),
                (vec![3], block(Area::Holding, 13, 1, &[4])),
                (vec![4], block(Area::Holding, 100, 100, &[5])),
                (vec![5], block(Area::Holding, 200, 26, &[6])),
                // Areas stay in the plan's order.
                (vec![2], block(Area::Input, 12, 1, &[3])),
            ]
        );
        // Only the blocks due take part.
        assert_eq!(join_adjoining(&blocks, &[0]).len(), 1);
    }
}
