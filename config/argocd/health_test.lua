-- Runs health.lua against sample PresenceCluster statuses:
--   lua5.4 config/argocd/health_test.lua
local dir = arg[0]:match("(.*/)") or "./"
local source = assert(io.open(dir .. "health.lua")):read("a")

local function health(obj)
  local env = setmetatable({ obj = obj }, { __index = _G })
  return assert(load(source, "health.lua", "t", env))()
end

local function cond(type_, status, reason, message)
  return { type = type_, status = status, reason = reason, message = message }
end

local cases = {
  { "no status yet", { metadata = { generation = 1 } }, "Progressing" },
  { "ready for the current generation",
    { metadata = { generation = 3 }, status = { observedGeneration = 3, conditions = {
      cond("Degraded", "False", "AsExpected", "no problems found"),
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Healthy" },
  { "ready, but for an older generation",
    { metadata = { generation = 4 }, status = { observedGeneration = 3, conditions = {
      cond("Ready", "True", "AllRegionsReady", "3 regions ready") } } }, "Progressing" },
  { "degraded wins over everything",
    { metadata = { generation = 2 }, status = { observedGeneration = 2, conditions = {
      cond("Degraded", "True", "SecretNotFound", "Secret ns/mine does not exist"),
      cond("Ready", "False", "SecretNotFound", "Secret ns/mine does not exist") } } }, "Degraded" },
  { "not ready yet",
    { metadata = { generation = 1 }, status = { observedGeneration = 1, conditions = {
      cond("Degraded", "False", "AsExpected", ""),
      cond("Ready", "False", "HubNotReady", "waiting for the hub") } } }, "Progressing" },
  { "paused",
    { metadata = { generation = 1 }, status = { observedGeneration = 1, conditions = {
      cond("Progressing", "False", "Paused", "paused") } } }, "Progressing" },
}

local failures = 0
for _, case in ipairs(cases) do
  local name, obj, want = case[1], case[2], case[3]
  local got = health(obj)
  if got.status ~= want then
    failures = failures + 1
    print(string.format("FAIL %s: want %s, got %s (%s)", name, want, got.status, got.message))
  else
    print(string.format("ok   %s: %s (%s)", name, got.status, got.message))
  end
end
local checks = 0
local function expect_message(case, needle)
  checks = checks + 1
  local message = health(cases[case][2]).message
  if not message:find(needle, 1, true) then
    failures = failures + 1
    print("FAIL message of '" .. cases[case][1] .. "' names " .. needle .. ": " .. message)
  end
end
expect_message(4, "SecretNotFound")
expect_message(6, "Paused")
print(string.format("%d passed, %d failed", #cases + checks - failures, failures))
os.exit(failures == 0 and 0 or 1)
