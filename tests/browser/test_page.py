"""The live presence page (examples/web/) in headless Chromium.

Run by scripts/test-browser.sh, which starts `presence-operator dev` (hub,
eu and us) and passes its addresses in the environment: PAGE_URL (the page's
own origin), TOKEN, API_CENTER, API_EU, API_US and DATA_DIR (for pid files).
Every wait polls the page's DOM with generous limits; nothing sleeps a fixed
time. The page runs against region us; writes go to the other regions.
"""

import json
import os
import signal
import sys
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

ENV = {name: os.environ[name] for name in ("PAGE_URL", "TOKEN", "API_CENTER", "API_EU", "API_US", "DATA_DIR")}
ME = "dev"  # the `sub` of the token dev mints
WAIT_SECS = 60  # a busy, shared 2-core machine: be generous


def api_request(api, method, user, body=None):
    """One API call with the dev token; returns (HTTP status, JSON body)."""
    request = urllib.request.Request(
        f"{api}/api/v2/presence/{urllib.parse.quote(user, safe='')}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {ENV['TOKEN']}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def set_presence(api, user, status, message):
    code, body = api_request(api, "POST", user, {"status": status, "message": message})
    assert code == 200, f"POST {user} at {api}: {code} {body}"
    return body


def new_driver():
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,820",
                "--disable-gpu", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:6]}@example.com"


class LivePage(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.driver = new_driver()

    @classmethod
    def tearDownClass(cls):
        cls.driver.quit()

    def tearDown(self):
        # On failure, show what the page said in its console.
        outcome = getattr(self, "_outcome", None)
        failed = outcome is not None and not outcome.success
        if failed:
            for entry in self.driver.get_log("browser"):
                print("browser console:", entry.get("message"), file=sys.stderr)
            print("page state:", self.conn_attrs(), file=sys.stderr)

    # ---- helpers -----------------------------------------------------------

    def open_page(self, users, region="us"):
        """Loads the page from its own origin, following `users` at `region`."""
        fragment = urllib.parse.urlencode({"token": ENV["TOKEN"], "region": region, "users": ",".join(users)})
        self.driver.get(f"{ENV['PAGE_URL']}#{fragment}")
        self.wait_for("the stream to be live", lambda d: self.conn_attrs()["state"] == "live")

    def wait_for(self, what, condition):
        def guarded(driver):
            try:
                return condition(driver)
            except StaleElementReferenceException:
                return False

        try:
            return WebDriverWait(self.driver, WAIT_SECS, poll_frequency=0.2).until(guarded)
        except TimeoutException:
            self.fail(f"timed out after {WAIT_SECS} s waiting for {what}; page: {self.conn_attrs()}; "
                      f"roster: {self.roster()}")

    def conn_attrs(self):
        conn = self.driver.find_element(By.ID, "conn")
        return {
            "state": conn.get_attribute("data-state"),
            "text": self.driver.find_element(By.ID, "conn-text").text,
            "connects": int(conn.get_attribute("data-connects") or 0),
            "lastEventId": conn.get_attribute("data-last-event-id") or "",
            "resumedFrom": conn.get_attribute("data-resumed-from") or "",
            "streamUrl": conn.get_attribute("data-stream-url") or "",
        }

    def roster(self):
        """{user: (status, message, last seen text, node)} as the page shows it."""
        rows = {}
        for li in self.driver.find_elements(By.CSS_SELECTOR, "#roster li.user"):
            rows[li.get_attribute("data-user")] = (
                li.get_attribute("data-status"),
                li.find_element(By.CSS_SELECTOR, ".message").get_attribute("textContent"),
                li.find_element(By.CSS_SELECTOR, ".last-seen").text,
                li.find_element(By.CSS_SELECTOR, ".node").text,
            )
        return rows

    def wait_shown(self, user, status, message):
        return self.wait_for(f"{user} shown {status} with {message!r}",
                             lambda d: (self.roster().get(user) or ())[:2] == (status, message))

    # ---- tests -----------------------------------------------------------

    def test_page_and_api_are_different_origins(self):
        page = urllib.parse.urlsplit(ENV["PAGE_URL"])
        for api in (ENV["API_CENTER"], ENV["API_EU"], ENV["API_US"]):
            self.assertNotEqual(page.netloc, urllib.parse.urlsplit(api).netloc)
        self.open_page([ME])
        self.assertEqual(Select(self.driver.find_element(By.ID, "region")).first_selected_option.get_attribute("value"), "us")
        self.assertIn(ENV["API_US"] + "/api/v2/presence/stream?", self.conn_attrs()["streamUrl"])
        self.assertIn("access_token=REDACTED", self.conn_attrs()["streamUrl"])

    def test_roster_follows_a_write_made_in_another_region(self):
        ann = unique("ann")
        self.open_page([ME, ann])
        self.assertEqual(self.roster()[ann][0], "offline", "a user never seen is offline")
        self.assertEqual(self.roster()[ann][2], "never seen")
        set_presence(ENV["API_EU"], ann, "busy", "written at eu")
        self.wait_shown(ann, "busy", "written at eu")
        status, message, seen, node = self.roster()[ann]
        self.assertEqual(seen, "just now")
        self.assertEqual(node, "via dev-eu-1", "the write was accepted at eu")

    def test_following_a_user_from_the_page(self):
        cat = unique("cat")
        set_presence(ENV["API_CENTER"], cat, "away", "set before following")
        self.open_page([ME])
        self.driver.find_element(By.ID, "add-input").send_keys(cat)
        self.driver.find_element(By.ID, "add-submit").click()
        self.wait_shown(cat, "away", "set before following")
        self.assertIn(urllib.parse.quote(cat, safe=""), self.driver.current_url, "followed users are kept in the URL")

    def test_stream_resumes_with_last_event_id_after_its_node_restarts(self):
        bob = unique("bob")
        self.open_page([ME, bob])
        set_presence(ENV["API_EU"], bob, "online", "before the restart")
        self.wait_shown(bob, "online", "before the restart")
        before = self.conn_attrs()
        self.assertTrue(before["lastEventId"].isdigit(), before)

        pid_file = os.path.join(ENV["DATA_DIR"], "pids", "presence-us.pid")
        with open(pid_file) as f:
            old_pid = int(f.read().strip())
        os.kill(old_pid, signal.SIGKILL)
        # Written while the page's node is down (or restarting): the page
        # can only learn of it from the resumed stream.
        set_presence(ENV["API_EU"], bob, "away", "while us restarted")

        self.wait_shown(bob, "away", "while us restarted")
        self.wait_for("the stream to be live again", lambda d: self.conn_attrs()["state"] == "live")
        after = self.conn_attrs()
        self.assertGreater(after["connects"], before["connects"], "the page opened a new stream")
        self.assertEqual(after["resumedFrom"], before["lastEventId"],
                         "the new stream resumed after the last event seen before the drop")
        self.assertIn(f"lastEventId={before['lastEventId']}", after["streamUrl"])
        self.assertGreater(int(after["lastEventId"]), int(before["lastEventId"]))
        with open(pid_file) as f:
            self.assertNotEqual(int(f.read().strip()), old_pid, "dev restarted presence-us")

    def test_status_form_sets_my_presence_and_shows_errors(self):
        self.open_page([ME])
        Select(self.driver.find_element(By.ID, "status-select")).select_by_value("busy")
        message = self.driver.find_element(By.ID, "message-input")
        message.clear()
        message.send_keys("Heads down until 3")
        self.driver.find_element(By.ID, "status-submit").click()
        self.wait_for("the form to report success",
                      lambda d: d.find_element(By.ID, "status-result").get_attribute("data-kind") == "ok")
        self.wait_shown(ME, "busy", "Heads down until 3")
        code, stored = api_request(ENV["API_CENTER"], "GET", ME)
        self.assertEqual((code, stored["status"], stored["message"]), (200, "busy", "Heads down until 3"))

        # The API's JSON error reaches the page across origins.
        message.clear()
        message.send_keys("x" * 257)
        self.driver.find_element(By.ID, "status-submit").click()
        self.wait_for("the form to report the API's error",
                      lambda d: d.find_element(By.ID, "status-result").get_attribute("data-kind") == "error")
        self.assertIn("message_too_long", self.driver.find_element(By.ID, "status-result").text)
        self.assertEqual(self.roster()[ME][:2], ("busy", "Heads down until 3"))


def save(driver, directory, name):
    path = os.path.join(directory, name)
    driver.save_screenshot(path)
    print(f"saved {path}")


def screenshots(directory):
    """The page with every status, for docs/screenshots/."""
    people = [
        ("ann@example.com", "online", "Reviewing the release notes"),
        ("bob@example.com", "away", "Lunch, back at 1"),
        ("carol@example.com", "busy", "Focus time until 3 pm"),
        ("dan@example.com", "offline", ""),
    ]
    set_presence(ENV["API_EU"], ME, "online", "On call this week")
    for user, status, message in people:
        set_presence(ENV["API_CENTER"], user, status, message)
    users = [ME] + [p[0] for p in people] + ["eve@example.com"]
    driver = new_driver()
    try:
        fragment = urllib.parse.urlencode({"token": ENV["TOKEN"], "region": "us", "users": ",".join(users)})
        driver.get(f"{ENV['PAGE_URL']}#{fragment}")

        def ready(d):
            rows = d.find_elements(By.CSS_SELECTOR, "#roster li.user")
            shown = {li.get_attribute("data-user"): li.get_attribute("data-status") for li in rows}
            live = d.find_element(By.ID, "conn").get_attribute("data-state") == "live"
            return live and all(shown.get(u) == s for u, s, _ in people) and shown.get("eve@example.com") == "offline"

        driver.set_window_size(1000, 900)
        WebDriverWait(driver, WAIT_SECS, poll_frequency=0.2).until(ready)
        driver.execute_script("document.activeElement && document.activeElement.blur()")
        save(driver, directory, "live-page.png")

        # The indicator while the page's node is down: it shows for at
        # least the first backoff (1 s), long enough to be caught.
        with open(os.path.join(ENV["DATA_DIR"], "pids", "presence-us.pid")) as f:
            os.kill(int(f.read().strip()), signal.SIGKILL)
        WebDriverWait(driver, WAIT_SECS, poll_frequency=0.1).until(
            lambda d: d.find_element(By.ID, "conn").get_attribute("data-state") == "reconnecting")
        save(driver, directory, "live-page-reconnecting.png")
    finally:
        driver.quit()


if __name__ == "__main__":
    result = unittest.main(exit=False, verbosity=2).result
    if not result.wasSuccessful():
        sys.exit(1)
    if os.environ.get("SCREENSHOT_DIR"):
        screenshots(os.environ["SCREENSHOT_DIR"])
