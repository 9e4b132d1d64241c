#!/usr/bin/env python3
"""Independent reference model of sagawatch's correlation semantics.

Written from the specification and docs/rules.md only, without reading src/, so that
tests/oracle.rs can compare `sagawatch replay` with it on random workloads (diff.py).
Straightforward and slow on purpose.

API:
    rules = load_rules(list_of_rule_dicts)      # the same dicts the generator writes as YAML
    out = replay(rules, inputs, lateness_ns=0, time_field="time", lifecycle=False)
        inputs: list of (source_name_or_None, [line strings])
        returns list of outcome dicts (times as int nanoseconds; 'within' as written)
"""
import json
import re
from collections import Counter

COVER = Counter()   # which branches a workload exercised (for generator tuning)

# ---------------------------------------------------------------- durations / times

_DUR_RE = re.compile(r'^(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?!s))?(?:(\d+)s)?(?:(\d+)ms)?$', re.ASCII)
_UNIT = {'d': 86400 * 10**9, 'h': 3600 * 10**9, 'm': 60 * 10**9, 's': 10**9, 'ms': 10**6}


def parse_duration(s):
    if not isinstance(s, str) or not s:
        raise ValueError('bad duration %r' % (s,))
    m = _DUR_RE.match(s)
    if not m or not any(m.groups()):
        raise ValueError('bad duration %r' % (s,))
    d, h, mi, se, ms = (int(x) if x else 0 for x in m.groups())
    total = d * _UNIT['d'] + h * _UNIT['h'] + mi * _UNIT['m'] + se * _UNIT['s'] + ms * _UNIT['ms']
    if total == 0:   # rules.md: durations are positive
        raise ValueError('bad duration %r' % (s,))
    return total


_TS_RE = re.compile(r'^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$', re.ASCII)


def _days_from_civil(y, m, d):
    y -= m <= 2
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


def parse_time(s):
    """RFC 3339 -> ns since epoch, or None."""
    if not isinstance(s, str):
        return None
    m = _TS_RE.match(s)
    if not m:
        return None
    y, mo, d, h, mi, se = (int(m.group(i)) for i in range(1, 7))
    mdays = [31, 29 if (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)) else 28, 31, 30, 31, 30,
             31, 31, 30, 31, 30, 31]
    if not (1 <= mo <= 12 and 1 <= d <= mdays[mo - 1] and h <= 23 and mi <= 59 and se <= 60):
        return None
    frac = m.group(7)
    ns = int((frac[1:] + '000000000')[:9]) if frac else 0
    tz = m.group(8)
    off = 0
    if tz not in ('Z', 'z'):
        sign = 1 if tz[0] == '+' else -1
        if int(tz[1:3]) > 23 or int(tz[4:6]) > 59:
            return None
        off = sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    secs = _days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - off
    t = secs * 10**9 + ns
    # rules.md: 1677-09-21T00:12:43.145224193Z .. 2262-04-11T23:47:16.854775807Z
    if not (-2**63 < t < 2**63):
        return None
    return t


def format_time(ns):
    """RFC 3339 UTC; fraction only when non-zero (3/6/9 digits)."""
    secs, frac = divmod(ns, 10**9)
    days, rem = divmod(secs, 86400)
    # civil from days
    z = days + 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    y = yoe + era * 400
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + (3 if mp < 10 else -9)
    y += m <= 2
    h, rem = divmod(rem, 3600)
    mi, se = divmod(rem, 60)
    s = '%04d-%02d-%02dT%02d:%02d:%02d' % (y, m, d, h, mi, se)
    if frac:
        if frac % 10**6 == 0:
            s += '.%03d' % (frac // 10**6)
        elif frac % 10**3 == 0:
            s += '.%06d' % (frac // 10**3)
        else:
            s += '.%09d' % frac
    return s + 'Z'

# ---------------------------------------------------------------- JSON decoding


class JFloat(float):
    """A JSON number that is not an integer token (fraction/exponent/-0/too big)."""


def _parse_int(s):
    if s == '-0':
        return JFloat(-0.0)
    v = int(s)
    if v < -2**63 or v >= 2**64:
        return JFloat(float(s))
    return v


def _parse_float(s):
    return JFloat(float(s))


def _no_constant(name):
    raise ValueError('not JSON: %s' % name)   # NaN, Infinity: Python-only


def decode(line):
    return json.loads(line, parse_int=_parse_int, parse_float=_parse_float,
                      parse_constant=_no_constant)


def is_num(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def jeq(a, b):
    """where equality: JSON types agree; numbers numerically; arrays/objects elementwise."""
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if is_num(a) and is_num(b):
        return a == b
    if isinstance(a, str) and isinstance(b, str):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(jeq(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return set(a) == set(b) and all(jeq(a[k], b[k]) for k in a)
    return False


_MISSING = object()


def get_path(ev, path):
    cur = ev
    for seg in path.split('.'):
        if isinstance(cur, dict):
            if seg not in cur:
                return _MISSING
            cur = cur[seg]
        elif isinstance(cur, list) and seg.isascii() and seg.isdigit() and seg == str(int(seg)):
            i = int(seg)
            if i >= len(cur):
                return _MISSING
            cur = cur[i]
        else:
            return _MISSING
    return cur


def key_of(ev, path):
    v = get_path(ev, path)
    if isinstance(v, bool) or v is _MISSING or v is None:
        return None
    if isinstance(v, str):
        if v == '' or len(v.encode('utf-8')) > 1024:
            return None
        return v
    if isinstance(v, int) and not isinstance(v, JFloat):
        return str(v)
    return None


def to_json_text(v):
    """serde_json compact serialisation (approximation for templates)."""
    if isinstance(v, JFloat) or (isinstance(v, float) and not isinstance(v, bool)):
        return _shortest(float(v))
    if isinstance(v, dict):   # serde_json's default map is sorted by key
        return '{' + ','.join(json.dumps(k, ensure_ascii=False) + ':' + to_json_text(v[k]) for k in sorted(v)) + '}'
    if isinstance(v, list):
        return '[' + ','.join(to_json_text(x) for x in v) + ']'
    return json.dumps(v, separators=(',', ':'), ensure_ascii=False)

def _shortest(f):
    """A float as serde_json writes it: the shortest digits that read back (repr's),
    laid out as its formatter (zmij) does: fixed notation for decimal exponents -5..15,
    else `d.ddde+N` / `de-N`."""
    import decimal
    if f == 0:
        return '-0.0' if str(f)[0] == '-' else '0.0'
    sign = '-' if f < 0 else ''
    t = decimal.Decimal(repr(abs(f))).normalize().as_tuple()
    digits = ''.join(map(str, t.digits))
    n = len(digits)
    e = n + t.exponent - 1          # f = d.ddd * 10**e
    if -5 <= e <= 15:
        if n - 1 <= e:
            out = digits + '0' * (e - n + 1) + '.0'
        elif e >= 0:
            out = digits[:e + 1] + '.' + digits[e + 1:]
        else:
            out = '0.' + '0' * (-e - 1) + digits
    else:
        out = digits[0] + ('.' + digits[1:] if n > 1 else '') + 'e' + ('+' if e >= 0 else '-') + str(abs(e))
    return sign + out

# ---------------------------------------------------------------- rules


class Matcher:
    def __init__(self, d):
        self.source = d.get('source')
        self.where = d.get('where') or {}
        self.key = d['key']

    def matches(self, ev, source):
        if self.source is not None and self.source != source:
            return False
        for path, val in self.where.items():
            v = get_path(ev, path)
            if v is _MISSING or not jeq(v, val):
                return False
        return True


class Step:
    def __init__(self, idx, d):
        self.idx = idx
        self.name = d['step']
        self.m = Matcher(d)
        self.within_str = d['within']
        self.within = parse_duration(d['within'])
        self.after = d.get('after')
        self.on_missing = d.get('on_missing')


class Rule:
    def __init__(self, idx, d):
        self.idx = idx
        self.name = d['name']
        self.trigger = Matcher(d['trigger'])
        self.steps = [Step(i, s) for i, s in enumerate(d['expect'])]
        self.by_name = {s.name: s for s in self.steps}
        self.cancels = [Matcher(c) for c in d.get('cancel') or []]
        self.on_missing = d.get('on_missing') or []
        self.dedup = parse_duration(d.get('dedup', '24h'))
        self.late = parse_duration(d.get('late', '24h'))
        self.labels = d.get('labels') or {}
        self.longest = max(s.within for s in self.steps)

    def children(self, name):
        return [s for s in self.steps if s.after == name]


def load_rules(dicts):
    return [Rule(i, d) for i, d in enumerate(dicts)]

# ---------------------------------------------------------------- templates

_TPL_RE = re.compile(r'\{\{\s*([^}]*?)\s*\}\}')


def render(s, ctx):
    def rep(m):
        name = m.group(1)
        if name in ('key', 'rule', 'step', 'within', 'deadline'):
            return ctx[name]
        if name.startswith('trigger.'):
            v = get_path(ctx['trigger'], name[len('trigger.'):])
            if v is _MISSING:
                return ''
            if isinstance(v, str):
                return v
            return to_json_text(v)
        raise ValueError('unknown placeholder ' + name)
    return _TPL_RE.sub(rep, s)


def render_value(v, ctx):
    if isinstance(v, str):
        return render(v, ctx)
    if isinstance(v, list):
        return [render_value(x, ctx) for x in v]
    if isinstance(v, dict):
        return {k: render_value(x, ctx) for k, x in v.items()}
    return v

# ---------------------------------------------------------------- engine


class StepState:
    __slots__ = ('status', 'deadline')

    def __init__(self):
        # pending | open | satisfied | missing | late | blocked | dropped
        self.status = 'pending'
        self.deadline = None


class Instance:
    def __init__(self, rule, key, T, trigger):
        self.rule = rule
        self.key = key
        self.T = T
        self.trigger = trigger
        self.open = True
        self.closed_at = None
        self.steps = {s.name: StepState() for s in rule.steps}


class Engine:
    def __init__(self, rules, lateness=0, lifecycle=False):
        self.rules = rules
        self.lateness = lateness
        self.lifecycle = lifecycle
        self.clock = None
        self.maxseen = None
        self.rows = {}      # (ri, key) -> Instance (open, or closed and remembered)
        self.early = {}     # (ri, key, stepname) -> event time
        self.cancels = {}   # (ri, key) -> expiry (cancel time + longest within)
        self.out = []

    # -- outputs
    def emit(self, d):
        self.out.append(d)

    def step_line(self, outcome, inst, step, extra=None):
        st = inst.steps[step.name]
        d = {'outcome': outcome, 'rule': inst.rule.name, 'key': inst.key, 'step': step.name,
             'deadline': st.deadline, 'within': step.within_str, 'at': self.clock,
             'opened_at': inst.T}
        if extra:
            d.update(extra)
        return d

    # -- clock
    def advance(self, t):
        self.maxseen = t if self.maxseen is None else max(self.maxseen, t)
        # rules.md: never below the earliest valid time
        c = max(self.maxseen - self.lateness, -2**63 + 1)
        self.clock = c if self.clock is None else max(self.clock, c)
        self.fire()

    def finish(self):
        if self.maxseen is None:
            return
        self.clock = max(self.clock, self.maxseen)
        self.fire()

    def fire(self):
        due = []
        for (ri, key), inst in self.rows.items():
            if not inst.open:
                continue
            for s in inst.rule.steps:
                st = inst.steps[s.name]
                if st.status == 'open' and st.deadline < self.clock:
                    due.append((st.deadline, ri, key.encode('utf-8'), s.idx, inst, s))
        due.sort(key=lambda x: x[:4])
        for _, _, _, _, inst, s in due:
            if inst.steps[s.name].status != 'open':
                continue
            self.mark_missing(inst, s)
            self.check_close(inst)

    # -- instance transitions
    def mark_missing(self, inst, step):
        st = inst.steps[step.name]
        st.status = 'missing'
        self.emit(self.step_line('missing', inst, step))
        self.run_actions(inst, step)
        self.block_behind(inst, step.name)

    def block_behind(self, inst, name):
        for c in inst.rule.children(name):
            if inst.steps[c.name].status == 'pending':
                inst.steps[c.name].status = 'blocked'
            self.block_behind(inst, c.name)

    def run_actions(self, inst, step):
        rule = inst.rule
        actions = step.on_missing if step.on_missing is not None else rule.on_missing
        st = inst.steps[step.name]
        ctx = {'key': inst.key, 'rule': rule.name, 'step': step.name, 'within': step.within_str,
               'deadline': format_time(st.deadline), 'trigger': inst.trigger}
        for a in actions:
            if 'alert' in a:
                al = a['alert'] or {}
                sev = render(al.get('severity', ''), ctx) if 'severity' in al else ''
                if sev == '':
                    sev = 'warning'
                labels = {}
                for k, v in rule.labels.items():
                    labels[k] = render(v, ctx)
                for k, v in (al.get('labels') or {}).items():
                    labels[k] = render(v, ctx)
                d = {'outcome': 'alert', 'rule': rule.name, 'key': inst.key, 'step': step.name,
                     'deadline': st.deadline, 'within': step.within_str, 'at': self.clock,
                     'opened_at': inst.T, 'severity': sev,
                     'summary': render(al.get('summary', ''), ctx), 'labels': labels}
                if 'description' in al:
                    d['description'] = render(al['description'], ctx)
                if 'sinks' in al:
                    d['sinks'] = list(al['sinks'])
                self.emit(d)
            elif 'compensate' in a:
                c = a['compensate']
                d = {'outcome': 'compensate', 'rule': rule.name, 'key': inst.key,
                     'step': step.name, 'deadline': st.deadline, 'within': step.within_str,
                     'at': self.clock, 'opened_at': inst.T, 'sink': c['sink'],
                     'payload': render_value(c.get('payload'), ctx)}
                self.emit(d)

    def open_step(self, inst, step, deadline):
        st = inst.steps[step.name]
        st.status = 'open'
        st.deadline = deadline
        ek = (inst.rule.idx, inst.key, step.name)
        if ek in self.early:
            te = self.early.pop(ek)
            if self.clock > te + step.within:
                COVER['early_expired_at_open'] += 1
            if self.clock <= te + step.within:     # still remembered
                if te <= deadline:
                    COVER['early_satisfies'] += 1
                    self.satisfy(inst, step, te)
                else:
                    # as in time order: missing, then late only within the late window
                    COVER['early_after_deadline'] += 1
                    self.mark_missing(inst, step)
                    if self.clock <= deadline + inst.rule.late:
                        st.status = 'late'
                        self.emit(self.step_line('late', inst, step, {'time': te}))

    def satisfy(self, inst, step, t):
        st = inst.steps[step.name]
        st.status = 'satisfied'
        if self.lifecycle:
            self.emit(self.step_line('satisfied', inst, step, {'time': t}))
        for c in inst.rule.children(step.name):
            if inst.steps[c.name].status == 'pending':
                self.open_step(inst, c, t + c.within)

    def forget_unopened(self, inst):
        # Early correlates remembered for steps the instance closed without opening were
        # its own: a later instance of the key does not take them.
        for name, st in inst.steps.items():
            if st.status in ('pending', 'blocked', 'dropped'):
                if self.early.pop((inst.rule.idx, inst.key, name), None) is not None:
                    COVER['early_forgotten_at_close'] += 1

    def check_close(self, inst):
        if inst.open and not any(st.status == 'open' for st in inst.steps.values()):
            inst.open = False
            inst.closed_at = self.clock
            self.forget_unopened(inst)
            if self.lifecycle:
                self.emit({'outcome': 'closed', 'rule': inst.rule.name, 'key': inst.key,
                           'at': self.clock, 'opened_at': inst.T})

    # -- applying an event
    def apply(self, ev, t, source):
        self.advance(t)
        for rule in self.rules:
            self.apply_cancel(rule, ev, t, source)
            for step in rule.steps:
                self.apply_step(rule, step, ev, t, source)
            self.apply_trigger(rule, ev, t, source)

    def apply_cancel(self, rule, ev, t, source):
        for m in rule.cancels:
            if not m.matches(ev, source):
                continue
            key = key_of(ev, m.key)
            if key is None:
                continue
            inst = self.rows.get((rule.idx, key))
            if inst is not None and inst.open:
                COVER['cancel_open'] += 1
                for st in inst.steps.values():
                    if st.status in ('open', 'pending'):
                        st.status = 'dropped'
                inst.open = False
                inst.closed_at = self.clock
                self.forget_unopened(inst)
                if self.lifecycle:
                    self.emit({'outcome': 'cancelled', 'rule': rule.name, 'key': key,
                               'at': self.clock, 'opened_at': inst.T, 'time': t})
            else:
                COVER['cancel_remembered'] += 1
                exp = t + rule.longest
                old = self.cancels.get((rule.idx, key))
                if old is None or old < exp:
                    self.cancels[(rule.idx, key)] = exp
            return  # only the first cancel matcher with a key applies

    def remember_early(self, rule, step, key, t):
        if self.clock > t + step.within:
            return      # already past its memory
        ek = (rule.idx, key, step.name)
        old = self.early.get(ek)
        if old is not None and self.clock <= old + step.within:
            COVER['early_dup'] += 1
            return
        if old is not None:
            COVER['early_replaced_expired'] += 1      # first remembered wins
        self.early[ek] = t

    def apply_step(self, rule, step, ev, t, source):
        if not step.m.matches(ev, source):
            return
        key = key_of(ev, step.m.key)
        if key is None:
            return
        inst = self.rows.get((rule.idx, key))
        if inst is None:
            self.remember_early(rule, step, key, t)
            return
        st = inst.steps[step.name]
        if inst.open:
            if st.status == 'open':
                if t <= st.deadline:
                    self.satisfy(inst, step, t)
                else:
                    COVER['live_after_deadline'] += 1
                    self.mark_missing(inst, step)
                    st.status = 'late'
                    self.emit(self.step_line('late', inst, step, {'time': t}))
                self.check_close(inst)
            elif st.status == 'missing':
                COVER['late_open_inst'] += 1
                if self.clock <= st.deadline + rule.late:
                    st.status = 'late'
                    self.emit(self.step_line('late', inst, step, {'time': t}))
            elif st.status == 'pending':
                COVER['early_pending'] += 1
                self.remember_early(rule, step, key, t)
            # satisfied / late / blocked: nothing
            return
        # closed, remembered instance
        if st.status == 'missing' and self.clock <= st.deadline + rule.late:
            COVER['late_closed'] += 1
            if self.clock > inst.closed_at + rule.dedup:
                COVER['late_closed_after_dedup'] += 1
            st.status = 'late'
            self.emit(self.step_line('late', inst, step, {'time': t}))
            return
        if self.clock <= inst.closed_at + rule.dedup:
            COVER['corr_closed_in_dedup'] += 1
            return      # belongs to the finished instance
        COVER['corr_closed_after_dedup'] += 1
        self.remember_early(rule, step, key, t)

    def apply_trigger(self, rule, ev, t, source):
        if not rule.trigger.matches(ev, source):
            return
        key = key_of(ev, rule.trigger.key)
        if key is None:
            return
        inst = self.rows.get((rule.idx, key))
        if inst is not None:
            if inst.open:
                COVER['trig_dup_open'] += 1
                return
            if self.clock <= inst.closed_at + rule.dedup:
                COVER['trig_dup_dedup'] += 1
                return
            COVER['trig_reopen'] += 1
        cexp = self.cancels.get((rule.idx, key))
        if cexp is not None and self.clock <= cexp:
            COVER['trig_blocked_cancel'] += 1
            return
        inst = Instance(rule, key, t, ev)
        self.rows[(rule.idx, key)] = inst
        if self.lifecycle:
            self.emit({'outcome': 'opened', 'rule': rule.name, 'key': key, 'at': self.clock,
                       'opened_at': t, 'time': t})
        for s in rule.steps:
            if s.after is None and inst.steps[s.name].status == 'pending':
                self.open_step(inst, s, t + s.within)
        self.check_close(inst)


def read_input(lines, time_field):
    """Yield (event, time) for the good lines of one input, in order."""
    for line in lines:
        if line.strip() == '':
            continue
        try:
            ev = decode(line)
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        t = parse_time(get_path(ev, time_field))
        if t is None:
            continue
        yield ev, t


def replay(rules, inputs, lateness=0, time_field='time', lifecycle=False):
    eng = Engine(rules, lateness, lifecycle)
    streams = [list(read_input(lines, time_field)) for _, lines in inputs]
    pos = [0] * len(streams)
    while True:
        best = None
        for i, s in enumerate(streams):
            if pos[i] < len(s):
                if best is None or s[pos[i]][1] < streams[best][pos[best]][1]:
                    best = i
        if best is None:
            break
        ev, t = streams[best][pos[best]]
        pos[best] += 1
        eng.apply(ev, t, inputs[best][0])
    eng.finish()
    return eng.out
