"""The Lua scripts of the redis store: each one runs in one bucket, atomically.

Redis runs a script without interleaving any other client's commands, so the checks and the
writes of a script are atomic with respect to every store object sharing the server. Every
script touches the keys of one bucket only (on a Redis Cluster, one hash slot), reads and
checks everything before its first write, and so leaves the data untouched when it fails: an
unreadable record raises before anything is written, and a Redis at ``maxmemory`` refuses a
script's first write (and so the whole script) rather than a later one.

Records are read without decoding their metadata: a record is the msgpack array
``[1, id, created_at, last_accessed, timeout_ms, version, metadata]``
(:func:`~workers.record.codec.encode_session`), and the scripts read its fixed header (Redis's
cmsgpack cannot read msgpack's bin type, which metadata may hold).
"""

from __future__ import annotations

#: Reading (and, for the access time, rewriting) a record's header.
_RECORD = r"""
-- msgpack integer or nil at position p of s: value (false for nil), next position.
local function mp_int(s, p)
  local b = string.byte(s, p)
  if b <= 0x7f then return b, p + 1 end
  if b >= 0xe0 then return b - 0x100, p + 1 end
  if b == 0xc0 then return false, p + 1 end
  local fmt = ({[0xcc] = '>I1', [0xcd] = '>I2', [0xce] = '>I4', [0xcf] = '>I8',
                [0xd0] = '>i1', [0xd1] = '>i2', [0xd2] = '>i4', [0xd3] = '>i8'})[b]
  if not fmt then error('session record: no integer at byte ' .. p) end
  return struct.unpack(fmt, s, p + 1)
end

-- The msgpack encoding of the integer n, in the shortest form (as Python's msgpack writes it).
local function mp_encode(n)
  if n >= 0 then
    if n < 0x80 then return string.char(n) end
    if n < 0x100 then return '\204' .. string.char(n) end
    if n < 0x10000 then return '\205' .. struct.pack('>I2', n) end
    if n < 0x100000000 then return '\206' .. struct.pack('>I4', n) end
    return '\207' .. struct.pack('>I8', n)
  end
  if n >= -32 then return string.char(0x100 + n) end
  return '\211' .. struct.pack('>i8', n)
end

-- Position just after the msgpack string at position p of s.
local function mp_str_end(s, p)
  local b = string.byte(s, p)
  if b >= 0xa0 and b <= 0xbf then return p + 1 + b - 0xa0 end
  if b == 0xd9 then return p + 2 + string.byte(s, p + 1) end
  if b == 0xda then return p + 3 + struct.unpack('>I2', s, p + 1) end
  if b == 0xdb then return p + 5 + struct.unpack('>I4', s, p + 1) end
  error('session record: no string at byte ' .. p)
end

-- version, last_accessed, timeout_ms (false: never expires), and where last_accessed's
-- bytes start and end, of a stored record.
local function header(record)
  if string.byte(record, 1) ~= 0x97 or string.byte(record, 2) ~= 0x01 then
    error('session record of an unknown format')
  end
  local _, at = mp_int(record, mp_str_end(record, 3))
  local last, after = mp_int(record, at)
  local timeout, p = mp_int(record, after)
  local version = mp_int(record, p)
  return version, last, timeout, at, after
end

-- version and expires_at (false: never) of a stored record.
local function version_and_expiry(record)
  local version, last, timeout = header(record)
  return version, timeout and (last + timeout)
end
"""

#: The conditional writes of one bucket, in order (:meth:`RedisStore.commit`).
COMMIT_SCRIPT = (
    _RECORD
    + r"""
-- KEYS[1]: the bucket's id index; KEYS[2]: its expiry index; KEYS[2 + i]: the key of write i;
-- after those, the keys rotates move sessions from. ARGV, 8 per write:
--   op: 'P' put, 'D' delete, 'M' mark (raise the number at its key, never lower it; always
--       takes effect);
--   id;
--   condition: a put's expected version, a delete's if_expired_at ('' for none);
--   record; expires_at ('' never); Redis TTL in ms ('' none);
--   version: a put's new version, a delete's expected version ('' none), a mark's value;
--   source: for a put that moves a session (rotate), the index in KEYS of the key it moves
--       from, which must hold the put's version ('' for none).
-- Returns one 0/1 per write. Phase 1 checks every write against the stored state (as changed
-- by the earlier writes of the batch) without writing; phase 2 writes. Once a write to a key
-- fails, the later writes to that key fail too (they were computed from the state it
-- expected); a put that moves a session fails its source key too when it fails.
local state, plan, results = {}, {}, {}
local function stored(key)
  local s = state[key]
  if s == nil then
    local record = redis.call('GET', key)
    s = {version = false, expires = false}
    if record then s.version, s.expires = version_and_expiry(record) end
    state[key] = s
  end
  return s
end

for i = 1, #ARGV / 8 do
  local a = (i - 1) * 8
  local op, cond, version = ARGV[a + 1], ARGV[a + 3], ARGV[a + 7]
  local ok = false
  if op == 'M' then
    ok = true
    plan[#plan + 1] = i
  else
    local s = stored(KEYS[2 + i])
    local source = ARGV[a + 8] ~= '' and stored(KEYS[tonumber(ARGV[a + 8])])
    if s.failed or (source and source.failed) then
      -- An earlier write of the batch to one of its keys did not take effect.
    elseif op == 'P' then
      if cond == '' then ok = not s.version else ok = s.version == tonumber(cond) end
      if ok and source then ok = source.version == tonumber(version) end
      if ok then
        s.version = tonumber(version)
        s.expires = ARGV[a + 5] ~= '' and tonumber(ARGV[a + 5])
        plan[#plan + 1] = i
      end
    elseif s.version then
      ok = (cond == '' or (s.expires and s.expires < tonumber(cond)))
        and (version == '' or s.version == tonumber(version))
      if ok then
        s.version, s.expires = false, false
        plan[#plan + 1] = i
      end
    else
      -- Nothing stored (Redis may have expired the key): drop index entries it left behind.
      plan[#plan + 1] = i
    end
    if not ok then
      s.failed = true
      if source then source.failed = true end
    end
  end
  results[i] = ok and 1 or 0
end

for _, i in ipairs(plan) do
  local a = (i - 1) * 8
  local key, id = KEYS[2 + i], ARGV[a + 2]
  if ARGV[a + 1] == 'M' then
    local ms = tonumber(ARGV[a + 7])
    if ms > (tonumber(redis.call('GET', key)) or 0) then redis.call('SET', key, ARGV[a + 7]) end
  elseif ARGV[a + 1] == 'P' then
    if ARGV[a + 6] == '' then
      redis.call('SET', key, ARGV[a + 4])
    else
      redis.call('SET', key, ARGV[a + 4], 'PX', ARGV[a + 6])
    end
    redis.call('ZADD', KEYS[1], 0, id)
    if ARGV[a + 5] == '' then
      redis.call('ZREM', KEYS[2], id)
    else
      redis.call('ZADD', KEYS[2], ARGV[a + 5], id)
    end
  else
    redis.call('DEL', key)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
end
return results
"""
)

#: Load sessions of one bucket, refreshing the access time of some (:meth:`load_touching`).
TOUCH_SCRIPT = (
    _RECORD
    + r"""
-- KEYS[1]: the bucket's expiry index; KEYS[1 + i]: the key of session i. ARGV[1]: now (ms);
-- ARGV[2]: the expiry grace (ms) added to a session's timeout for its Redis TTL; then, per
-- session, its id and '1' to refresh it or '0' to read it only. Returns the records (nil for
-- none). A session to refresh that is live at now and was last accessed before now is stored
-- and returned with last_accessed = now, its Redis TTL and expiry entry moved on and its
-- version unchanged: the same as a Put of Session.accessed(now) that expects its version.
local now, grace = tonumber(ARGV[1]), tonumber(ARGV[2])
local records, refreshed = {}, {}
for i = 1, #KEYS - 1 do
  local record = redis.call('GET', KEYS[1 + i])
  records[i] = record
  if record and ARGV[2 + 2 * i] == '1' then
    local _, last, timeout, at, after = header(record)
    if last < now and not (timeout and now > last + timeout) then
      records[i] = string.sub(record, 1, at - 1) .. mp_encode(now) .. string.sub(record, after)
      refreshed[#refreshed + 1] = {i, timeout}
    end
  end
end
for _, r in ipairs(refreshed) do
  local i, timeout = r[1], r[2]
  if timeout then
    redis.call('SET', KEYS[1 + i], records[i], 'PX', timeout + grace)
    redis.call('ZADD', KEYS[1], now + timeout, ARGV[1 + 2 * i])
  else
    redis.call('SET', KEYS[1 + i], records[i])
  end
end
return records
"""
)

#: Live sessions of one bucket at ARGV[1]: every id, minus those whose expires_at is before it.
COUNT_SCRIPT = """
return redis.call('ZCARD', KEYS[1]) - redis.call('ZCOUNT', KEYS[2], '-inf', '(' .. ARGV[1])
"""
