-- Argo CD health check for presencecluster.io/PresenceCluster.
-- Degraded when the operator reports Degraded=True; Suspended while paused
-- (annotation presencecluster.io/paused="true" and a condition with reason
-- Paused); Healthy only when Ready=True for the current generation;
-- Progressing otherwise.
local hs = { status = "Progressing", message = "Waiting for the operator to report status" }
if obj.status == nil or obj.status.conditions == nil then
  return hs
end
local generation = obj.metadata and obj.metadata.generation
local observed = obj.status.observedGeneration
local annotations = obj.metadata and obj.metadata.annotations
local annotated = annotations ~= nil and annotations["presencecluster.io/paused"] == "true"
local ready, degraded, progressing
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Ready" then ready = condition end
  if condition.type == "Degraded" then degraded = condition end
  if condition.type == "Progressing" then progressing = condition end
end
if degraded ~= nil and degraded.status == "True" then
  hs.status = "Degraded"
  hs.message = (degraded.reason or "Degraded") .. ": " .. (degraded.message or "")
  return hs
end
-- A paused object keeps observedGeneration at the last generation the
-- operator applied, so this comes before the generation comparison.
local paused
if ready ~= nil and ready.reason == "Paused" then
  paused = ready
elseif progressing ~= nil and progressing.reason == "Paused" then
  paused = progressing
end
if paused ~= nil then
  if annotated then
    hs.status = "Suspended"
    hs.message = paused.message or "Paused"
  else
    hs.message = "Resuming: waiting for the operator to reconcile"
  end
  return hs
end
if generation ~= nil and observed ~= generation then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end
local latest = ready or progressing
if latest ~= nil then
  hs.message = (latest.reason or "NotReady") .. ": " .. (latest.message or "")
end
return hs
